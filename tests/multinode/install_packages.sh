#!/usr/bin/env bash
# System packages for the multi-node tests (tests/multinode): SLURM (slurmctld, slurmd, client), munge, sshd and
# pdsh, from Debian's repositories. Needs root and apt-get; elsewhere it says so and those tests are skipped. Where
# it has both and the install fails, it fails: CI must not pass without the cluster tests on a machine that can run
# them (tests/multinode/test_launchers.py fails there too, under RLHF_DS_REQUIRE_CLUSTER=1, set by .ci/run).
PKGS="slurmd slurmctld slurm-client munge openssh-server openssh-client pdsh iproute2 util-linux"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "multi-node test packages not installed (needs root and apt-get): tests/multinode will skip the cluster tests"
  exit 0
fi
missing=$(for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
[ -z "$missing" ] && exit 0
# policy-rc.d-less machines would start the daemons system-wide: the tests start their own, so keep them off
if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added=1; fi
{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; } \
  > /tmp/rlhf_ds-apt.log 2>&1
rc=$?
[ -n "${added:-}" ] && rm -f /usr/sbin/policy-rc.d
if [ $rc -ne 0 ]; then
  echo "error: apt-get install of the multi-node test packages failed (see /tmp/rlhf_ds-apt.log); this machine has root and apt-get, so the cluster tests must run here" >&2
  tail -5 /tmp/rlhf_ds-apt.log >&2
  exit 1
fi
exit 0
