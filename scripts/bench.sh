#!/bin/bash
# scripts/bench.sh: fio side by side, flexnbd against nbdkit, qemu-nbd and
# nbd-server, all serving the same file on loopback. Run through `make bench`.
#
# Every round starts each server on a free port, then runs every workload on
# every server in turn (the server order rotates from one round to the next),
# then stops them, so slow drift of a shared machine hits all servers alike.
# The report gives medians over the rounds; see docs/BENCHMARKS.md.
#
# Environment:
#   ROUNDS=3              rounds (each server runs each workload once a round)
#   RUNTIME=10            seconds measured per fio run (after RAMP)
#   RAMP=1                fio ramp_time in seconds, not counted
#   SERVERS="flexnbd nbdkit qemu-nbd nbd-server"
#                         also flexnbd-proxy and nbdkit-proxy: flexnbd proxy,
#                         or nbdkit's nbd plugin, in front of a flexnbd serve
#                         of the same file (`make bench-proxy`)
#   SUBJECT=flexnbd REFERENCE=nbdkit
#                         the pair whose per-round ratio the report gives
#   WORKLOADS="rr4k_qd1 rr4k_qd32 rw4k_qd32 sr1m_qd8 sw1m_qd8"
#                         or RW_BS_QD, e.g. randrw_64k_16
#   FLEXNBD_BENCH_DIR     data and results (default ${TMPDIR:-/tmp}/flexnbd-bench)
#   FLEXNBD_BENCH_SIZE=2G size of the random data file
#   FLEXNBD=bin/flexnbd   the binary under test
#   QUIET_LIMIT=40        before each run, wait (up to QUIET_WAIT=30 seconds)
#                         until the machine as a whole is less busy than this
#                         (% of one core, summed over all cores); 0 disables
#
# Exits 0 when the benchmark ran, whatever the numbers; it asserts nothing.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPORT="/usr/bin/python3 $ROOT/scripts/bench-report.py"
export PATH=$PATH:/usr/sbin:/sbin

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
SERVERS=${SERVERS:-"flexnbd nbdkit qemu-nbd nbd-server"}
export SUBJECT=${SUBJECT:-flexnbd} REFERENCE=${REFERENCE:-nbdkit}
WORKLOADS=${WORKLOADS:-"rr4k_qd1 rr4k_qd32 rw4k_qd32 sr1m_qd8 sw1m_qd8"}
BENCH_DIR=${FLEXNBD_BENCH_DIR:-${TMPDIR:-/tmp}/flexnbd-bench}
SIZE=${FLEXNBD_BENCH_SIZE:-2G}
FLEXNBD=${FLEXNBD:-$ROOT/bin/flexnbd}
QUIET_LIMIT=${QUIET_LIMIT:-40}
QUIET_WAIT=${QUIET_WAIT:-30}
HOST=127.0.0.1
START_TIMEOUT=20
STOP_TIMEOUT=10

INVOCATION="ROUNDS=$ROUNDS RUNTIME=$RUNTIME RAMP=$RAMP QUIET_LIMIT=$QUIET_LIMIT SERVERS=\"$SERVERS\" WORKLOADS=\"$WORKLOADS\" SUBJECT=$SUBJECT REFERENCE=$REFERENCE make bench"

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() { say "error: $*"; exit 1; }

# --- which servers can run ---------------------------------------------------

server_binary() {
    case $1 in
    flexnbd | flexnbd-proxy) echo "$FLEXNBD" ;;
    nbdkit | qemu-nbd | nbd-server) echo "$1" ;;
    nbdkit-proxy) echo nbdkit ;;
    *) return 1 ;;
    esac
}

ACTIVE=()
SKIPPED=()
for s in $SERVERS; do
    bin=$(server_binary "$s") || fail "unknown server '$s' (known: flexnbd nbdkit qemu-nbd nbd-server flexnbd-proxy nbdkit-proxy)"
    if command -v "$bin" >/dev/null 2>&1; then
        ACTIVE+=("$s")
    else
        case $s in
        flexnbd | flexnbd-proxy) fail "$FLEXNBD not found; run 'make build' or use 'make bench'" ;;
        nbdkit) fail "nbdkit is required for the comparison; install nbdkit" ;;
        esac
        say "skipping $s: '$bin' is not installed"
        SKIPPED+=("$s")
    fi
done
[ ${#ACTIVE[@]} -gt 0 ] || fail "no server to benchmark"
for tool in fio ss sync; do
    command -v $tool >/dev/null || fail "$tool is required"
done

wl_args() { # workload key -> "rw bs iodepth"
    case $1 in
    rr4k_qd1) echo "randread 4k 1" ;;
    rr4k_qd32) echo "randread 4k 32" ;;
    rw4k_qd32) echo "randwrite 4k 32" ;;
    sr1m_qd8) echo "read 1m 8" ;;
    sw1m_qd8) echo "write 1m 8" ;;
    *_*_*) echo "${1//_/ }" ;;
    *) return 1 ;;
    esac
}
for wl in $WORKLOADS; do
    wl_args "$wl" >/dev/null || fail "unknown workload '$wl'"
done

# --- data --------------------------------------------------------------------

mkdir -p "$BENCH_DIR/data" || fail "cannot create $BENCH_DIR"
IMG=$BENCH_DIR/data/random-$SIZE.img
if [ ! -f "$IMG" ]; then
    say "creating $IMG ($SIZE of random data, once)"
    head -c "$SIZE" /dev/urandom >"$IMG.tmp" && mv "$IMG.tmp" "$IMG" || fail "cannot write $IMG"
fi
IMG_BYTES=$(stat -c %s "$IMG")
say "reading $IMG into the page cache"
cat "$IMG" >/dev/null

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$BENCH_DIR/results/$STAMP
mkdir -p "$OUT"
CSV=$OUT/raw.csv
echo "round,server,workload,iops,mibps,lat_avg_us,lat_p99_us,srv_cpu_pct,srv_us_per_op,fio_cpu_pct,sys_busy_pct,other_pct,wall_s,error" >"$CSV"

# --- starting and stopping servers -------------------------------------------

free_port() {
    /usr/bin/python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

listener_pid() {
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2
}

children_of() { # every descendant of $1
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        children_of "$c"
    done
}

# Per server, indexed by name. BACKEND is the flexnbd serve behind a proxy.
declare -A PORT PID LAUNCHER EXPORT TMPCONF BACKEND

# start_backend NAME: the flexnbd serve a proxy forwards to; sets BPORT.
BPORT=
start_backend() {
    local t=0
    BPORT=$(free_port)
    setsid "$FLEXNBD" serve --addr "$HOST" --port "$BPORT" --file "$IMG" -q >>"$OUT/$1.backend.log" 2>&1 </dev/null &
    BACKEND[$1]=$!
    until listening "$BPORT"; do
        sleep 0.1
        t=$((t + 1))
        [ $t -lt $((START_TIMEOUT * 10)) ] || return 1
    done
}

# start NAME: launch the server on a fresh port and wait until it listens.
start() {
    local s=$1 port log cmd t=0 conf=
    port=$(free_port)
    log=$OUT/$s.log
    EXPORT[$s]=
    case $s in
    flexnbd)
        cmd=("$FLEXNBD" serve --addr "$HOST" --port "$port" --file "$IMG" -q) ;;
    flexnbd-proxy)
        start_backend "$s" || return 1
        cmd=("$FLEXNBD" proxy --addr "$HOST" --port "$port" --conn-addr "$HOST" --conn-port "$BPORT" -q) ;;
    nbdkit-proxy)
        start_backend "$s" || return 1
        cmd=(nbdkit -f -i "$HOST" -p "$port" nbd "hostname=$HOST" "port=$BPORT") ;;
    nbdkit)
        cmd=(nbdkit -f -i "$HOST" -p "$port" file "file=$IMG") ;;
    qemu-nbd)
        cmd=(qemu-nbd --persistent -f raw --cache=writeback --aio=threads --shared=16
            -b "$HOST" -p "$port" "$IMG") ;;
    nbd-server)
        # nbd-server takes its exports from a config file and daemonises; the
        # daemon is found through its listening socket below.
        conf=$(mktemp -d "${TMPDIR:-/tmp}/flexnbd-bench-nbd-server.XXXXXX")
        TMPCONF[$s]=$conf
        EXPORT[$s]=bench
        {
            echo "[generic]"
            echo "port = $port"
            echo "listenaddr = $HOST"
            echo "allowlist = true"
            echo "[bench]"
            echo "exportname = $IMG"
            echo "flush = true"
            echo "fua = true"
            echo "trim = true"
        } >"$conf/config"
        cmd=(nbd-server -C "$conf/config" -p "$conf/pid") ;;
    esac
    echo "${cmd[*]}" >"$OUT/$s.cmd"
    setsid "${cmd[@]}" >>"$log" 2>&1 </dev/null &
    LAUNCHER[$s]=$!
    until listening "$port"; do
        sleep 0.1
        t=$((t + 1))
        if [ $t -ge $((START_TIMEOUT * 10)) ]; then
            tail -n 20 "$log" >&2
            return 1
        fi
        if ! kill -0 "${LAUNCHER[$s]}" 2>/dev/null; then
            # A daemonising server's launcher exits 0; anything else failed.
            if ! wait "${LAUNCHER[$s]}"; then
                tail -n 20 "$log" >&2
                LAUNCHER[$s]=
                return 1
            fi
            LAUNCHER[$s]=
        fi
    done
    PORT[$s]=$port
    PID[$s]=$(listener_pid "$port")
    [ -n "${PID[$s]}" ] || [ ! -f "$conf/pid" ] || PID[$s]=$(cat "$conf/pid")
    [ -n "${PID[$s]}" ] || return 1
    say "$s listening on $HOST:$port (pid ${PID[$s]})"
}

# stop NAME: TERM the server and its descendants by pid, KILL what stays.
stop() {
    local s=$1 pids alive t=0 p
    [ -n "${PID[$s]:-}" ] || return 0
    pids="${PID[$s]} $(children_of "${PID[$s]}")"
    if [ -n "${LAUNCHER[$s]:-}" ] && [ "${LAUNCHER[$s]}" != "${PID[$s]}" ]; then
        pids="$pids ${LAUNCHER[$s]}"
    fi
    kill -TERM $pids 2>/dev/null
    while :; do
        alive=
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        [ -z "$alive" ] && break
        if [ $t -ge $((STOP_TIMEOUT * 10)) ]; then
            say "$s did not stop on TERM; killing$alive"
            kill -KILL $alive 2>/dev/null
            break
        fi
        sleep 0.1
        t=$((t + 1))
    done
    [ -n "${LAUNCHER[$s]:-}" ] && wait "${LAUNCHER[$s]}" 2>/dev/null
    [ -n "${TMPCONF[$s]:-}" ] && rm -rf "${TMPCONF[$s]}"
    if [ -n "${BACKEND[$s]:-}" ]; then
        kill -TERM "${BACKEND[$s]}" 2>/dev/null
        wait "${BACKEND[$s]}" 2>/dev/null
        BACKEND[$s]=
    fi
    PID[$s]=
    LAUNCHER[$s]=
    TMPCONF[$s]=
}

stop_all() {
    local s
    for s in "${ACTIVE[@]}"; do stop "$s"; done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# --- one measurement ---------------------------------------------------------

# quiet: on a shared machine, give unrelated work a chance to finish before a
# run. Samples the whole machine's CPU over half a second until it is below
# QUIET_LIMIT or QUIET_WAIT seconds have gone by; the run starts either way.
quiet() {
    local b0 b1 a0 a1 busy x deadline=$((SECONDS + QUIET_WAIT))
    [ "$QUIET_LIMIT" -gt 0 ] || return 0
    while :; do
        read -r x b0 a0 x <<<"$($REPORT ticks $$)"
        sleep 0.5
        read -r x b1 a1 x <<<"$($REPORT ticks $$)"
        busy=$(((b1 - b0) * 100 * $(nproc) / (a1 - a0 > 0 ? a1 - a0 : 1)))
        [ "$busy" -lt "$QUIET_LIMIT" ] && return 0
        if [ $SECONDS -ge $deadline ]; then
            say "machine still ${busy}% busy after ${QUIET_WAIT}s; running anyway"
            return 0
        fi
    done
}

# measure ROUND SERVER WORKLOAD: one fio run, one CSV row.
measure() {
    local r=$1 s=$2 wl=$3 rw bs qd out uri rc t0 t1 c0 c1 b0 b1 all0 all1 n0 n1 n w
    local iops mibps lat p99 fcpu ferr wall cpu per busy
    read -r rw bs qd <<<"$(wl_args "$wl")"
    out=$OUT/$wl.$s.r$r.json
    uri="nbd://$HOST:${PORT[$s]}/${EXPORT[$s]}"
    sync
    quiet
    read -r c0 b0 all0 n0 <<<"$($REPORT ticks "${PID[$s]}")"
    t0=$(date +%s.%N)
    fio --name="$wl" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --numjobs=1 --size="$IMG_BYTES" --time_based --runtime="$RUNTIME" \
        --ramp_time="$RAMP" --norandommap --randrepeat=0 \
        --output-format=json --output="$out" >"$out.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    # A forking server (nbd-server) serves the connection in a child; wait
    # for it to be reaped so its CPU shows up in the parent's cutime/cstime.
    for w in $(seq 20); do
        read -r c1 b1 all1 n1 <<<"$($REPORT ticks "${PID[$s]}")"
        [ "$n1" -le "$n0" ] && break
        sleep 0.1
    done
    if [ $rc -ne 0 ] || [ ! -s "$out" ]; then
        say "round $r $s $wl: fio failed (rc $rc), see $out.log"
        echo "$r,$s,$wl,0,0,0,0,0,0,0,0,0,0,fio-rc-$rc" >>"$CSV"
        return
    fi
    read -r iops mibps lat p99 fcpu ferr <<<"$($REPORT fio "$out")"
    # other: what the rest of the machine used meanwhile (busy minus server
    # and fio), a measure of how disturbed the run was.
    read -r wall cpu per busy other <<<"$(awk -v t0="$t0" -v t1="$t1" -v c="$((c1 - c0))" \
        -v hz="$(getconf CLK_TCK)" -v iops="$iops" -v b="$((b1 - b0))" \
        -v all="$((all1 - all0))" -v ncpu="$(nproc)" -v fcpu="$fcpu" 'BEGIN {
            wall = t1 - t0
            cpu = c / hz / wall * 100
            per = iops > 0 ? cpu / 100 / iops * 1e6 : 0
            busy = all > 0 ? b / all * 100 * ncpu : 0
            other = busy - cpu - fcpu
            if (other < 0) other = 0
            printf "%.2f %.1f %.2f %.1f %.1f\n", wall, cpu, per, busy, other
        }')"
    echo "$r,$s,$wl,$iops,$mibps,$lat,$p99,$cpu,$per,$fcpu,$busy,$other,$wall,$ferr" >>"$CSV"
    say "$(printf 'round %d %-10s %-9s %9.0f IOPS %7.0f MiB/s  server %3.0f%% of a core, %5.1f µs/op; others %3.0f%%' \
        "$r" "$s" "$wl" "$iops" "$mibps" "$cpu" "$per" "$other")"
}

# --- the run -----------------------------------------------------------------

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
say "results go to $OUT"
say "servers: ${ACTIVE[*]}; workloads: $WORKLOADS; $ROUNDS rounds of ${RUNTIME}s (+${RAMP}s ramp)"

n=${#ACTIVE[@]}
for r in $(seq 1 "$ROUNDS"); do
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${ACTIVE[$(((i + r - 1) % n))]}"); done
    up=()
    for s in "${order[@]}"; do
        if start "$s"; then
            up+=("$s")
        else
            case $s in
            flexnbd | nbdkit) fail "$s did not start; see $OUT/$s.log" ;;
            esac
            say "round $r: $s did not start, skipped (see $OUT/$s.log)"
            stop "$s"
        fi
    done
    for wl in $WORKLOADS; do
        for s in "${up[@]}"; do
            measure "$r" "$s" "$wl"
        done
    done
    stop_all
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ------------------------------------------------------------------

version() {
    case $1 in
    flexnbd) echo "flexnbd $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')" ;;
    nbdkit) nbdkit --version 2>/dev/null | head -n1 ;;
    qemu-nbd) qemu-nbd --version 2>/dev/null | head -n1 ;;
    nbd-server) nbd-server -V 2>&1 | grep -o 'version.*' | sed 's/^/nbd-server /' ;;
    esac
}

{
    echo "## flexnbd benchmark, $DATE"
    echo
    echo "- command: \`$INVOCATION\` (scripts/bench.sh)"
    echo "- kernel: $(uname -r); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "- $(fio --version): nbd engine, 1 job, 1 connection, ${RUNTIME}s + ${RAMP}s ramp per run; data: $IMG_BYTES bytes of random data in the page cache"
    echo "- servers: $(for s in "${ACTIVE[@]}"; do printf '%s; ' "$(version "$s")"; done | sed 's/; $//')"
    [ ${#SKIPPED[@]} -gt 0 ] && echo "- not installed, skipped: ${SKIPPED[*]}"
    echo "- load average before / after: $LOAD0 / $LOAD1"
    echo
    $REPORT report "$CSV"
    echo
    echo "Raw rows: $CSV"
} | tee "$OUT/summary.md"
exit 0
