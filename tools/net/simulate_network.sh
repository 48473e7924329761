#!/usr/bin/env bash
# Runs an MPI job (e.g. data-parallel `handgrad train`) on ONE machine as if its ranks sat on
# separate hosts joined by an ordinary network, to measure what the network costs.
#
# Usage (as root):
#   tools/net/simulate_network.sh --rate RATE [--delay DELAY] [--np N] [options] -- COMMAND [ARGS...]
#
#   e.g. tools/net/simulate_network.sh --rate 1gbit --delay 0.1ms -- \
#            target/release/handgrad train --model stories15m --batch 1 --seq 64 --steps 4
#
# Each rank runs in its own Linux network namespace (hgnet-<pid>-<rank>). With --np 2 the two
# namespaces are joined by one veth pair (rank r has 10.213.0.<r+1>/24); with more ranks every
# rank's veth goes to a bridge (a switch) in a further namespace hgnet-<pid>-sw. Every veth end is
# shaped on its egress, so both directions of every link are limited:
#   * netem "delay DELAY rate RATE" when the kernel has netem (CONFIG_NET_SCH_NETEM);
#   * otherwise tbf "rate RATE" (bandwidth only) and one line says the delay was NOT added.
# Open MPI is forced onto TCP over the veths (--mca btl tcp,self, btl_tcp_if_include the subnet),
# so no shared memory. mpirun itself runs in rank 0's namespace and its PMIx server listens on
# rank 0's veth address (PMIX_MCA_ptl_tcp_if_include), since the ranks in the other namespaces
# cannot reach its default 127.0.0.1 listener; each rank enters its namespace through a small
# wrapper (exec ip netns exec hgnet-<pid>-$OMPI_COMM_WORLD_RANK COMMAND...).
# Namespaces (and with them the veths and qdiscs) are removed on exit, also on Ctrl-C/TERM;
# the exit code is the command's (mpirun's). After the run the bytes each shaped qdisc sent are
# printed, which shows that the MPI traffic went through the shaping.
#
# Options:
#   --rate RATE        link bandwidth, each direction, in tc units: 100mbit, 1gbit, 10gbit...
#                      (careful: tc reads "mbps" as megaBYTES per second). Default 1gbit.
#   --delay DELAY      one-way latency added on each link (round trip = 2 x DELAY): 100us,
#                      0.5ms, 20ms. Needs netem in the kernel. Default: none.
#   --np N             number of ranks (default 2; N > 2 uses a bridge).
#   --shaper KIND      auto (netem if available, else tbf), netem, or tbf. Default auto.
#   --mtu BYTES        MTU of the simulated links (default 1500; 9000 for jumbo frames).
#   --queue-ms MS      tbf only: queue (bytes) = MS of traffic at RATE, beyond it packets drop
#                      (default 200; TCP's own back-pressure keeps it from filling).
#   --subnet A.B.C     the /24 the ranks live on (default 10.213.0); it exists only inside this
#                      run's namespaces, so concurrent runs do not collide.
#   --mpirun-args STR  extra mpirun options, split on spaces (e.g. "--bind-to none").
#   --cleanup-stale    delete hgnet-<pid>-* namespaces whose script <pid> is gone (left by a run
#                      killed with SIGKILL) and exit.
#   -h, --help         show this text.
# Requirements: root, iproute2 (ip, tc), Open MPI's mpirun (tested with 4.1.4 / PMIx 4.2).
set -euo pipefail

me=simulate_network
say() { echo "$me: $*" >&2; }
die() { echo "$me: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^# Requirements/p' "$0" | sed 's/^# \{0,1\}//'; }

rate=1gbit
delay=
np=2
shaper=auto
mtu=1500
subnet=10.213.0
mpirun_extra=
queue_ms=200
cleanup_stale=0
while (($#)); do
  case "$1" in
    --rate) rate=${2:?--rate needs a value}; shift 2 ;;
    --rate=*) rate=${1#*=}; shift ;;
    --delay) delay=${2:?--delay needs a value}; shift 2 ;;
    --delay=*) delay=${1#*=}; shift ;;
    --np) np=${2:?--np needs a value}; shift 2 ;;
    --np=*) np=${1#*=}; shift ;;
    --shaper) shaper=${2:?--shaper needs a value}; shift 2 ;;
    --shaper=*) shaper=${1#*=}; shift ;;
    --mtu) mtu=${2:?--mtu needs a value}; shift 2 ;;
    --mtu=*) mtu=${1#*=}; shift ;;
    --subnet) subnet=${2:?--subnet needs a value}; shift 2 ;;
    --subnet=*) subnet=${1#*=}; shift ;;
    --mpirun-args) mpirun_extra=${2?--mpirun-args needs a value}; shift 2 ;;
    --mpirun-args=*) mpirun_extra=${1#*=}; shift ;;
    --queue-ms) queue_ms=${2:?--queue-ms needs a value}; shift 2 ;;
    --queue-ms=*) queue_ms=${1#*=}; shift ;;
    --cleanup-stale) cleanup_stale=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after --; see --help)" ;;
  esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces and tc need it)"
for tool in ip tc; do command -v "$tool" >/dev/null || die "'$tool' not found (install iproute2)"; done

if ((cleanup_stale)); then
  for ns in $(ip netns list | awk '{print $1}' | grep -E '^hgnet-[0-9]+-' || true); do
    pid=${ns#hgnet-}; pid=${pid%%-*}
    if ! kill -0 "$pid" 2>/dev/null; then ip netns del "$ns" && say "deleted stale namespace $ns"; fi
  done
  exit 0
fi

(($#)) || die "no command given (put it after --; see --help)"
command -v mpirun >/dev/null || die "mpirun not found (install Open MPI)"
mpirun --version 2>&1 | grep -q "Open MPI" || die "mpirun is not Open MPI (the MCA options used here are Open MPI's)"
[[ $np =~ ^[0-9]+$ ]] && ((np >= 2 && np <= 250)) || die "--np must be 2..250"
[[ $mtu =~ ^[0-9]+$ ]] && ((mtu >= 576 && mtu <= 65535)) || die "--mtu must be 576..65535"
[[ $subnet =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "--subnet must look like 10.213.0"
[[ $shaper =~ ^(auto|netem|tbf)$ ]] || die "--shaper must be auto, netem or tbf"
[[ $queue_ms =~ ^[0-9]+$ ]] && ((queue_ms >= 1)) || die "--queue-ms must be a whole number of milliseconds >= 1"

# RATE in tc's units -> bytes per second (tc: bit/kbit/mbit/gbit/tbit are bits per second, SI;
# kibit/mibit/... binary; bps/kbps/mbps/... are BYTES per second; a bare number is bits/s).
rate_Bps=$(awk -v r="$rate" 'BEGIN {
  if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
  n = substr(r, 1, RLENGTH) + 0; u = tolower(substr(r, RLENGTH + 1))
  split("k m g t", p, " "); m = 1; ok = (u == "" || u == "bit" || u == "bps")
  for (i = 1; i <= 4; i++) {
    if (u == p[i] "bit" || u == p[i] "bps") { m = 1000 ^ i; ok = 1 }
    if (u == p[i] "ibit" || u == p[i] "ibps") { m = 1024 ^ i; ok = 1 }
  }
  if (!ok || n <= 0) exit 1
  b = n * m; if (u ~ /bit$/ || u == "") b /= 8
  printf "%.0f", b }') || die "cannot read --rate '$rate' (use tc units, e.g. 100mbit, 1gbit)"
((rate_Bps >= 1000)) || die "--rate '$rate' is below 8 kbit/s"
if [[ ${rate,,} == *bps ]]; then say "note: tc reads '$rate' as BYTES per second ($((rate_Bps * 8 / 1000000)) Mbit/s)"; fi
if [[ -n $delay ]]; then
  [[ $delay =~ ^[0-9]+(\.[0-9]+)?(s|ms|msec|us|usec)$ ]] || die "cannot read --delay '$delay' (e.g. 100us, 0.5ms, 20ms)"
fi

# tbf parameters. burst: 1 ms of traffic at RATE, at least two full frames: the most that may
# leave faster than RATE at once (a real NIC never bursts, so keep it small; a GSO packet larger
# than the burst is split into frames by tbf, which costs CPU but only at low rates, since from
# about 0.5 Gbit/s on 1 ms holds a whole 64 KiB GSO packet). limit: a queue of --queue-ms of
# traffic (at least burst + 128 KiB), deep enough that TCP is slowed by back-pressure (TCP small
# queues), as on a sender whose NIC is the bottleneck, rather than by drops.
burst=$((rate_Bps / 1000)); ((burst >= 2 * (mtu + 14))) || burst=$((2 * (mtu + 14)))
limit=$((rate_Bps * queue_ms / 1000)); ((limit >= burst + 131072)) || limit=$((burst + 131072))
((limit <= 1 << 30)) || limit=$((1 << 30))   # the kernel holds it in 32 bits

tag=$$
prefix=hgnet-$tag
nets=()
for ((r = 0; r < np; r++)); do nets+=("$prefix-$r"); done
switch_ns=
((np > 2)) && switch_ns=$prefix-sw
tmp=$(mktemp -d "${TMPDIR:-/tmp}/hgnet-$tag.XXXXXX")
mpi_pid=
got_signal=

cleanup() {
  local rc=$? ns
  trap - EXIT INT TERM HUP
  if [[ -n $mpi_pid ]] && kill -0 "$mpi_pid" 2>/dev/null; then
    kill -TERM "$mpi_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$mpi_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$mpi_pid" 2>/dev/null || true
  fi
  for ns in "${nets[@]}" ${switch_ns:+"$switch_ns"}; do
    if [[ -e /run/netns/$ns ]]; then
      # Processes still inside would keep the namespace alive after its name is gone.
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || say "warning: could not delete namespace $ns"
    fi
  done
  rm -rf "$tmp"
  exit "$rc"
}
on_signal() {
  got_signal=$1
  # mpirun started in the background ignores SIGINT; TERM makes it stop its ranks and exit.
  [[ -n $mpi_pid ]] && kill -TERM "$mpi_pid" 2>/dev/null || exit $((128 + $2))
}
trap cleanup EXIT
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

# --- topology ---------------------------------------------------------------------------------
for ns in "${nets[@]}" ${switch_ns:+"$switch_ns"}; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
links=()   # "namespace device delay?" for every shaped veth end
if ((np == 2)); then
  ip link add veth0 netns "${nets[0]}" type veth peer name veth0 netns "${nets[1]}"
  links+=("${nets[0]} veth0 delay" "${nets[1]} veth0 delay")
else
  ip -n "$switch_ns" link add br0 type bridge
  ip -n "$switch_ns" link set br0 up
  for ((r = 0; r < np; r++)); do
    ip link add veth0 netns "${nets[r]}" type veth peer name "port$r" netns "$switch_ns"
    ip -n "$switch_ns" link set "port$r" mtu "$mtu" master br0 up
    # The delay goes on the rank's side only, so one way through the switch is DELAY once.
    links+=("${nets[r]} veth0 delay" "$switch_ns port$r nodelay")
  done
fi
for ((r = 0; r < np; r++)); do
  ip -n "${nets[r]}" link set veth0 mtu "$mtu"
  ip -n "${nets[r]}" addr add "$subnet.$((r + 1))/24" dev veth0
  ip -n "${nets[r]}" link set veth0 up
done

# --- shaping ----------------------------------------------------------------------------------
netem_missing=0
apply_tbf() { ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$rate" burst "$burst" limit "$limit"; }
apply_netem() {  # $3: delay|nodelay
  local args=()
  [[ $3 == delay && -n $delay ]] && args+=(delay "$delay")
  ip netns exec "$1" tc qdisc replace dev "$2" root netem "${args[@]}" rate "$rate" limit 100000
}
use=$shaper
if [[ $use != tbf ]]; then
  read -r ns dev d <<<"${links[0]}"
  if err=$(apply_netem "$ns" "$dev" "$d" 2>&1); then
    use=netem
  elif [[ $use == auto && ${err,,} == *"unknown"* ]]; then
    use=tbf; netem_missing=1
  else
    die "tc netem failed on $dev in $ns: $err"
  fi
fi
for link in "${links[@]}"; do
  read -r ns dev d <<<"$link"
  if [[ $use == netem ]]; then apply_netem "$ns" "$dev" "$d"; else apply_tbf "$ns" "$dev"; fi
done

# --- launch -----------------------------------------------------------------------------------
cat >"$tmp/enter-rank-netns" <<EOF
#!/bin/sh
# Started by mpirun for each rank: run the command in that rank's network namespace.
exec ip netns exec "$prefix-\${OMPI_COMM_WORLD_RANK:?not started by Open MPI's mpirun}" "\$@"
EOF
chmod +x "$tmp/enter-rank-netns"

cidr=$subnet.0/24
if ((np == 2)); then topo="one veth pair"; else topo="a switch (bridge in $switch_ns), one veth per rank"; fi
say "simulating $np hosts: namespaces $prefix-0..$((np - 1)) on $cidr, $topo, MTU $mtu"
if [[ $use == netem ]]; then
  say "link: $rate each direction (netem rate), one-way delay ${delay:-none}${delay:+ (round trip $delay x 2)}"
else
  say "link: $rate each direction (tbf: burst $burst bytes = max(1 ms at rate, 2 frames), queue limit $limit bytes)"
  if ((netem_missing)); then
    if [[ -n $delay ]]; then
      say "WARNING: delay NOT added (--delay $delay ignored): this kernel lacks the netem qdisc (CONFIG_NET_SCH_NETEM); simulating bandwidth only"
    else
      say "no delay (this kernel lacks netem, so none could be added; bandwidth only)"
    fi
  elif [[ -n $delay ]]; then
    say "WARNING: delay NOT added (--delay $delay ignored): --shaper tbf shapes bandwidth only"
  else
    say "no added delay"
  fi
fi
say "MPI transport: Open MPI TCP over the veths (--mca btl tcp,self --mca btl_tcp_if_include $cidr), no shared memory"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# mpirun's PMIx server must listen where ranks in other namespaces can reach it (not 127.0.0.1).
export PMIX_MCA_ptl_tcp_if_include=$cidr
read -r -a extra <<<"$mpirun_extra"
ip netns exec "${nets[0]}" mpirun -np "$np" --oversubscribe \
  --mca btl tcp,self --mca btl_tcp_if_include "$cidr" --mca oob_tcp_if_include "$cidr" \
  "${extra[@]}" "$tmp/enter-rank-netns" "$@" &
mpi_pid=$!
rc=0
while :; do
  wait "$mpi_pid" && rc=0 || rc=$?
  kill -0 "$mpi_pid" 2>/dev/null || break   # still running: wait was cut short by a signal
done
mpi_pid=

# --- report -----------------------------------------------------------------------------------
for link in "${links[@]}"; do
  read -r ns dev d <<<"$link"
  ip netns exec "$ns" tc -s qdisc show dev "$dev" | awk -v where="$ns/$dev" -v me="$me" '
    /^qdisc/ { kind = $2 }
    /Sent/ { d = $7; gsub(/,/, "", d)
             printf "%s: shaped (%s) egress of %s: %.1f MB in %d packets, %d dropped\n", me, kind, where, $2 / 1e6, $4, d }' >&2
done
if [[ -n $got_signal ]]; then
  say "stopped by SIG$got_signal"
  case $got_signal in INT) exit 130 ;; TERM) exit 143 ;; HUP) exit 129 ;; esac
fi
exit "$rc"
