#!/usr/bin/env bash
# A two-"node" cluster on one machine for the multi-node tests: network namespaces rlhf-h1 / rlhf-h2 on a bridge,
# each with its own address and hostname (host1 / host2 in /etc/hosts), an sshd in each (key login for root), munge,
# slurmctld in the root namespace and a slurmd in each namespace. Every daemon is started and stopped by PID.
#   cluster.sh up DIR     start (DIR holds keys, configs, logs, pid files)
#   cluster.sh down DIR   stop everything `up` started and remove the namespaces and /etc/hosts lines
# Needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN and Debian's slurmd slurmctld slurm-client munge openssh-server pdsh.
# (Recipe: ../shared/docs/multinode-on-one-box.md. nsenter, not `ip netns exec`: the latter remounts /sys, which
# hides /sys/fs/cgroup, and slurmd then refuses to start.)
set -euo pipefail
CMD=$1; W=$2; NET=${RLHF_TEST_NET:-10.79.0}; PORT=${RLHF_TEST_SLURM_PORT:-26817}
in_host() { local i=$1; shift; nsenter --net=/run/netns/rlhf-h$i unshare --uts sh -c 'hostname "$0"; exec "$@"' host$i "$@"; }
wait_pidfile() { for _ in $(seq 100); do [ -s "$1" ] && { echo "$(cat "$1"):$2" >> "$W/pids"; return; }; sleep 0.1; done; echo "no pid file $1" >&2; exit 1; }

down() {
  set +e
  [ -f "$W/slurm/slurm.conf" ] && SLURM_CONF=$W/slurm/slurm.conf timeout 10 scontrol shutdown >/dev/null 2>&1 && sleep 2
  if [ -f "$W/pids" ]; then
    while IFS=: read -r pid comm; do  # only if that PID is still the process we started
      [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$comm" ] && kill "$pid" 2>/dev/null
    done < "$W/pids"
    rm -f "$W/pids"
  fi
  for i in 1 2; do ip netns del rlhf-h$i 2>/dev/null; ip link del rlhfv$i 2>/dev/null; done
  ip link del rlhfbr0 2>/dev/null
  # rewrite in place: /etc/hosts may be a bind mount that cannot be renamed over
  if grep -q '# rlhf-test$' /etc/hosts; then grep -v '# rlhf-test$' /etc/hosts > "$W/hosts.tmp"; cat "$W/hosts.tmp" > /etc/hosts; fi
  return 0
}

up() {
  ( down )  # what an earlier run may have left
  rm -rf "$W"; mkdir -p "$W"/ssh "$W"/slurm/{state,log,spool/host1,spool/host2}
  ip link add rlhfbr0 type bridge; ip addr add $NET.1/24 dev rlhfbr0; ip link set rlhfbr0 up
  for i in 1 2; do
    ip netns add rlhf-h$i
    ip link add rlhfv$i type veth peer name eth0 netns rlhf-h$i
    ip link set rlhfv$i master rlhfbr0; ip link set rlhfv$i up
    ip -n rlhf-h$i addr add $NET.1$i/24 dev eth0; ip -n rlhf-h$i link set eth0 up; ip -n rlhf-h$i link set lo up
    echo "$NET.1$i host$i # rlhf-test" >> /etc/hosts
  done
  ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/id"; ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/hostkey"
  cp "$W/ssh/id.pub" "$W/ssh/authorized_keys"; mkdir -p /run/sshd
  for i in 1 2; do
    printf '%s\n' "ListenAddress $NET.1$i" "HostKey $W/ssh/hostkey" "PidFile $W/ssh/sshd_h$i.pid" \
      "PermitRootLogin prohibit-password" "PasswordAuthentication no" "KbdInteractiveAuthentication no" "UsePAM no" \
      "StrictModes no" "AuthorizedKeysFile $W/ssh/authorized_keys" "AcceptEnv *" > "$W/ssh/sshd_h$i"
    in_host $i /usr/sbin/sshd -f "$W/ssh/sshd_h$i" -E "$W/ssh/sshd_h$i.log"
    wait_pidfile "$W/ssh/sshd_h$i.pid" sshd
  done
  printf '%s\n' "Host host1 host2 host3" "  User root" "  IdentityFile $W/ssh/id" "  IdentitiesOnly yes" \
    "  StrictHostKeyChecking no" "  UserKnownHostsFile /dev/null" "  LogLevel ERROR" "  BatchMode yes" \
    "  ConnectTimeout 5" > "$W/ssh/config"
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge; chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey -c 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    wait_pidfile /run/munge/munged.pid munged
  fi
  S=$W/slurm
  cat > "$S/slurm.conf" <<CONF
ClusterName=rlhftest
SlurmctldHost=$(hostname -s)($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$PORT
SlurmdPort=$((PORT+1))
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=30
NodeName=host1 NodeAddr=$NET.11 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
NodeName=host2 NodeAddr=$NET.12 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -f "$S/slurm.conf"; wait_pidfile "$S/slurmctld.pid" slurmctld
  for i in 1 2; do in_host $i slurmd -f "$S/slurm.conf"; wait_pidfile "$S/slurmd-host$i.pid" slurmd; done
  for _ in $(seq 100); do [ "$(SLURM_CONF=$S/slurm.conf sinfo -h -N -t idle | wc -l)" -eq 2 ] && return 0; sleep 0.3; done
  echo "slurm nodes did not become idle:" >&2; SLURM_CONF=$S/slurm.conf sinfo -N >&2; tail -5 "$S"/log/* >&2; exit 1
}

case $CMD in up) up;; down) down;; *) echo "usage: cluster.sh up|down DIR" >&2; exit 2;; esac
