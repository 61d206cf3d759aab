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
#                         of the same file (`make bench-proxy`); and
#                         flexnbd-metrics: flexnbd serve with --metrics
#                         flexnbd-base: flexnbd serve from FLEXNBD_BASE, an
#                         earlier build, to A/B two builds in one run
#   SUBJECT=flexnbd REFERENCE=nbdkit
#                         the pair whose per-round ratio the report gives
#   WORKLOADS="rr4k_qd1 rr4k_qd32 rw4k_qd32 sr1m_qd8 sw1m_qd8"
#                         or RW_BS_QD, e.g. randrw_64k_16; keys are
#                         {rr,rw,sr,sw}BS[_cCONNS]_qdQD[_iIDLE]: rr4k_c8_qd1 is
#                         4 KiB random reads on 8 connections (fio jobs) at
#                         QD1 each; a _i1000 tail runs it beside 1000 idle
#                         connections to the same server. Two sets:
#                         "scale" (SCALE connections, see below) and "idle"
#                         (IDLE_BASE with and without IDLE idle connections)
#   SCALE="1 2 4 8 16 64" connection counts of the scale set: 4k random read
#                         and write at QD1 on each, then 4 connections at QD8
#                         and 1 at QD32
#   IDLE=1000 IDLE_BASE="rr4k_c8_qd1 rw4k_c8_qd1"
#                         the idle set; each idle run follows its base run
#                         on the same server (precedes it in even rounds)
#   FLEXNBD_BENCH_DIR     data and results (default ${TMPDIR:-/tmp}/flexnbd-bench)
#   FLEXNBD_BENCH_SIZE=2G size of the random data file
#   FLEXNBD=bin/flexnbd   the binary under test
#   FLEXNBD_BASE          the binary of the flexnbd-base server kind
#   GO=go                 builds internal/benchtools/idlers for idle runs
#   STAGGER_MS=0          if set, the connections of one workload start at
#                         random within (connections - 1) * STAGGER_MS ms
#   FIO_GRACE=60          seconds past RAMP + RUNTIME after which a fio run
#                         that has not ended is killed and counted as failed
#   SERVER_CPUS CLIENT_CPUS
#                         if set (taskset lists, e.g. 0 and 1), servers (and
#                         a proxy's backend) run on SERVER_CPUS and fio and
#                         the idle connections on CLIENT_CPUS, so that the
#                         load generator cannot take the server's processor
#                         or the server the load generator's
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
SCALE=${SCALE:-"1 2 4 8 16 64"}
IDLE=${IDLE:-1000}
IDLE_BASE=${IDLE_BASE:-"rr4k_c8_qd1 rw4k_c8_qd1"}
GO=${GO:-go}
STAGGER_MS=${STAGGER_MS:-0}
FIO_GRACE=${FIO_GRACE:-60}
BENCH_DIR=${FLEXNBD_BENCH_DIR:-${TMPDIR:-/tmp}/flexnbd-bench}
SIZE=${FLEXNBD_BENCH_SIZE:-2G}
FLEXNBD=${FLEXNBD:-$ROOT/bin/flexnbd}
QUIET_LIMIT=${QUIET_LIMIT:-40}
QUIET_WAIT=${QUIET_WAIT:-30}
SERVER_CPUS=${SERVER_CPUS:-}
CLIENT_CPUS=${CLIENT_CPUS:-}
SERVER_PIN=() CLIENT_PIN=()
[ -n "$SERVER_CPUS" ] && SERVER_PIN=(taskset -c "$SERVER_CPUS")
[ -n "$CLIENT_CPUS" ] && CLIENT_PIN=(taskset -c "$CLIENT_CPUS")
HOST=127.0.0.1
START_TIMEOUT=20
STOP_TIMEOUT=10

INVOCATION="ROUNDS=$ROUNDS RUNTIME=$RUNTIME RAMP=$RAMP QUIET_LIMIT=$QUIET_LIMIT SERVERS=\"$SERVERS\" WORKLOADS=\"$WORKLOADS\" SUBJECT=$SUBJECT REFERENCE=$REFERENCE make bench"
case " $WORKLOADS " in
*" scale "*) INVOCATION="SCALE=\"$SCALE\" $INVOCATION" ;;
esac
case " $WORKLOADS " in
*" idle "* | *_i[0-9]*) INVOCATION="IDLE=$IDLE IDLE_BASE=\"$IDLE_BASE\" $INVOCATION" ;;
esac
[ -n "$SERVER_CPUS$CLIENT_CPUS" ] && INVOCATION="SERVER_CPUS=$SERVER_CPUS CLIENT_CPUS=$CLIENT_CPUS $INVOCATION"
[ -n "${FLEXNBD_BENCH_SIZE:-}" ] && INVOCATION="FLEXNBD_BENCH_SIZE=$SIZE $INVOCATION"

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() { say "error: $*"; exit 1; }

# --- which servers can run ---------------------------------------------------

server_binary() {
    case $1 in
    flexnbd | flexnbd-proxy | flexnbd-metrics) echo "$FLEXNBD" ;;
    flexnbd-base) echo "${FLEXNBD_BASE:-}" ;;
    nbdkit | qemu-nbd | nbd-server) echo "$1" ;;
    nbdkit-proxy) echo nbdkit ;;
    *) return 1 ;;
    esac
}

ACTIVE=()
SKIPPED=()
for s in $SERVERS; do
    bin=$(server_binary "$s") || fail "unknown server '$s' (known: flexnbd nbdkit qemu-nbd nbd-server flexnbd-proxy nbdkit-proxy flexnbd-metrics flexnbd-base)"
    if command -v "$bin" >/dev/null 2>&1; then
        ACTIVE+=("$s")
    else
        case $s in
        flexnbd | flexnbd-proxy | flexnbd-metrics) fail "$FLEXNBD not found; run 'make build' or use 'make bench'" ;;
        flexnbd-base) fail "flexnbd-base needs FLEXNBD_BASE, the binary of the build to compare with" ;;
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

wl_args() { # workload key -> "rw bs iodepth connections idle"
    local k=$1 idle=0 conns=1 rw bs qd
    if [[ $k =~ ^(.+)_i([0-9]+)$ ]]; then
        k=${BASH_REMATCH[1]} idle=${BASH_REMATCH[2]}
    fi
    if [[ $k =~ ^(rr|rw|sr|sw)([0-9]+[km])(_c([0-9]+))?_qd([0-9]+)$ ]]; then
        case ${BASH_REMATCH[1]} in
        rr) rw=randread ;;
        rw) rw=randwrite ;;
        sr) rw=read ;;
        sw) rw=write ;;
        esac
        bs=${BASH_REMATCH[2]} conns=${BASH_REMATCH[4]:-1} qd=${BASH_REMATCH[5]}
    elif [[ $k =~ ^([a-z]+)_([0-9]+[kmKM]?)_([0-9]+)$ ]]; then
        rw=${BASH_REMATCH[1]} bs=${BASH_REMATCH[2]} qd=${BASH_REMATCH[3]}
    else
        return 1
    fi
    [ "$conns" -ge 1 ] && [ "$qd" -ge 1 ] || return 1
    echo "$rw $bs $qd $conns $idle"
}

# expand_workloads: WORKLOADS with the sets spelled out, each key once, and
# each idle run right after its base run, so that the pair is measured
# minutes apart at most.
expand_workloads() {
    local wl n base list=() plain=() out=() idle=()
    declare -A seen
    for wl in $WORKLOADS; do
        case $wl in
        scale)
            # One connection keeps make bench's key (rr4k_qd1).
            for n in $SCALE; do
                [ "$n" = 1 ] && n= || n=_c$n
                list+=("rr4k${n}_qd1" "rw4k${n}_qd1")
            done
            list+=(rr4k_c4_qd8 rw4k_c4_qd8 rr4k_qd32 rw4k_qd32) ;;
        idle)
            for base in $IDLE_BASE; do list+=("$base" "${base}_i$IDLE"); done ;;
        *) list+=("$wl") ;;
        esac
    done
    for wl in "${list[@]}"; do
        [ -z "${seen[$wl]:-}" ] || continue
        seen[$wl]=1
        if [[ $wl =~ ^(.+)_i[0-9]+$ ]]; then idle+=("$wl"); else plain+=("$wl"); fi
    done
    for wl in "${idle[@]}"; do
        base=${wl%_i*}
        [ -n "${seen[$base]:-}" ] && continue
        seen[$base]=1
        plain+=("$base")
    done
    for base in "${plain[@]}"; do
        out+=("$base")
        for wl in "${idle[@]}"; do
            [ "${wl%_i*}" = "$base" ] && out+=("$wl")
        done
    done
    echo "${out[*]}"
}
WL_LIST=$(expand_workloads)
MAX_CONNS=1
MAX_IDLE=0
for wl in $WL_LIST; do
    read -r _ _ _ conns idle <<<"$(wl_args "$wl")" || fail "unknown workload '$wl'"
    [ -n "$conns" ] || fail "unknown workload '$wl'"
    [ "$conns" -gt "$MAX_CONNS" ] && MAX_CONNS=$conns
    [ "$idle" -gt "$MAX_IDLE" ] && MAX_IDLE=$idle
done

# round_order ROUND: the workloads of one round. In even rounds an idle
# run goes before its base run, so that slow drift of the machine does not
# always favour the same side of the pair.
round_order() {
    local r=$1 wl group=() out=()
    if [ $((r % 2)) -eq 1 ]; then
        echo "$WL_LIST"
        return
    fi
    for wl in $WL_LIST; do
        if [[ $wl =~ _i[0-9]+$ ]]; then
            group=("$wl" "${group[@]}")
        else
            out+=("${group[@]}")
            group=("$wl")
        fi
    done
    out+=("${group[@]}")
    echo "${out[*]}"
}

# Every connection, idle or busy, is a descriptor in the server (and the
# idle ones in the helper too): make room under the hard limit.
NEED_FDS=$((MAX_IDLE + MAX_CONNS + 256))
if [ "$(ulimit -Sn)" != unlimited ] && [ "$(ulimit -Sn)" -lt "$NEED_FDS" ]; then
    ulimit -Sn "$NEED_FDS" 2>/dev/null ||
        fail "$NEED_FDS descriptors needed for $MAX_IDLE idle and $MAX_CONNS busy connections; ulimit -Hn is $(ulimit -Hn)"
fi
# qemu-nbd refuses clients beyond --shared; 16 unless more are needed.
QEMU_SHARED=16
[ $((MAX_IDLE + MAX_CONNS)) -gt $QEMU_SHARED ] && QEMU_SHARED=$((MAX_IDLE + MAX_CONNS))

# --- data --------------------------------------------------------------------

mkdir -p "$BENCH_DIR/data" || fail "cannot create $BENCH_DIR"
IMG=$BENCH_DIR/data/random-$SIZE.img
if [ ! -f "$IMG" ]; then
    say "creating $IMG ($SIZE of random data, once)"
    head -c "$SIZE" /dev/urandom >"$IMG.tmp" && mv "$IMG.tmp" "$IMG" || fail "cannot write $IMG"
fi
IMG_BYTES=$(stat -c %s "$IMG")
IDLERS=
if [ "$MAX_IDLE" -gt 0 ]; then
    IDLERS=$BENCH_DIR/idlers
    (cd "$ROOT" && "$GO" build -o "$IDLERS" ./internal/benchtools/idlers) || fail "cannot build internal/benchtools/idlers"
fi
say "reading $IMG into the page cache"
cat "$IMG" >/dev/null

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$BENCH_DIR/results/$STAMP
mkdir -p "$OUT"
CSV=$OUT/raw.csv
echo "round,server,workload,iops,mibps,lat_avg_us,lat_p99_us,srv_cpu_pct,srv_us_per_op,fio_cpu_pct,sys_busy_pct,other_pct,wall_s,error,lat_p50_us,lat_p999_us,conns,idle,idle_open" >"$CSV"

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
    setsid "${SERVER_PIN[@]}" "$FLEXNBD" serve --addr "$HOST" --port "$BPORT" --file "$IMG" -q >>"$OUT/$1.backend.log" 2>&1 </dev/null &
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
    flexnbd-base)
        cmd=("$FLEXNBD_BASE" serve --addr "$HOST" --port "$port" --file "$IMG" -q) ;;
    flexnbd-metrics)
        cmd=("$FLEXNBD" serve --addr "$HOST" --port "$port" --file "$IMG" -q --metrics "$HOST:0") ;;
    flexnbd-proxy)
        start_backend "$s" || return 1
        cmd=("$FLEXNBD" proxy --addr "$HOST" --port "$port" --conn-addr "$HOST" --conn-port "$BPORT" -q) ;;
    nbdkit-proxy)
        start_backend "$s" || return 1
        cmd=(nbdkit -f -i "$HOST" -p "$port" nbd "hostname=$HOST" "port=$BPORT") ;;
    nbdkit)
        cmd=(nbdkit -f -i "$HOST" -p "$port" file "file=$IMG") ;;
    qemu-nbd)
        cmd=(qemu-nbd --persistent -f raw --cache=writeback --aio=threads --shared=$QEMU_SHARED
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
    setsid "${SERVER_PIN[@]}" "${cmd[@]}" >>"$log" 2>&1 </dev/null &
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
# FIO_PID: the fio run in progress (its jobs are its children); WATCHDOG:
# the process group that kills it if it hangs.
FIO_PID=
WATCHDOG=
stop_fio() {
    [ -z "$WATCHDOG" ] || kill -KILL -- -"$WATCHDOG" 2>/dev/null
    [ -z "$FIO_PID" ] || kill -KILL $(children_of "$FIO_PID") "$FIO_PID" 2>/dev/null
}
trap 'stop_fio; stop_idlers; stop_all' EXIT
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

# start_idlers SERVER N OUT: open N idle connections to SERVER with the
# idlers helper and wait until all have negotiated; sets IDLERS_PID.
IDLERS_PID=
start_idlers() {
    local s=$1 n=$2 out=$3 t=0
    rm -f "$out.ready"
    "${CLIENT_PIN[@]}" "$IDLERS" -addr "$HOST:${PORT[$s]}" -export "${EXPORT[$s]}" -conns "$n" -ready "$out.ready" \
        >"$out" 2>"$out.log" </dev/null &
    IDLERS_PID=$!
    until [ -e "$out.ready" ]; do
        if ! kill -0 "$IDLERS_PID" 2>/dev/null; then
            wait "$IDLERS_PID"
            IDLERS_PID=
            return 1
        fi
        sleep 0.1
        t=$((t + 1))
        if [ $t -ge 1200 ]; then
            stop_idlers
            return 1
        fi
    done
}

# stop_idlers: close the idle connections; the helper then writes how many
# of them the server had kept open to its output file.
stop_idlers() {
    [ -n "$IDLERS_PID" ] || return 0
    kill -TERM "$IDLERS_PID" 2>/dev/null
    wait "$IDLERS_PID" 2>/dev/null
    IDLERS_PID=
}

# settle SERVER PROCS: once idle connections were closed, wait (up to 30 s)
# until the server holds no connection and has no more descendant processes
# than PROCS, so that tearing down a thousand connections (or, for
# nbd-server, their processes) does not land in the next run.
settle() {
    local s=$1 procs=$2 n t=0
    while :; do
        read -r _ _ _ n <<<"$($REPORT ticks "${PID[$s]}")"
        if [ "$n" -le "$procs" ] && [ -z "$(ss -Htn state established "sport = :${PORT[$s]}" 2>/dev/null)" ]; then
            return 0
        fi
        if [ $t -ge 300 ]; then
            say "$s still holds connections or processes 30 s after the idle ones closed"
            return 0
        fi
        sleep 0.1
        t=$((t + 1))
    done
}

# measure ROUND SERVER WORKLOAD: one fio run, one CSV row.
measure() {
    local r=$1 s=$2 wl=$3 rw bs qd conns idle out uri rc t0 t1 c0 c1 b0 b1 all0 all1 n0 n1 n w
    local iops mibps lat p99 fcpu ferr p50 p999 wall cpu per busy idle_open=0 idle_out procs stagger=()
    read -r rw bs qd conns idle <<<"$(wl_args "$wl")"
    out=$OUT/$wl.$s.r$r.json
    uri="nbd://$HOST:${PORT[$s]}/${EXPORT[$s]}"
    sync
    if [ "$idle" -gt 0 ]; then
        idle_out=$OUT/$wl.$s.r$r.idlers.json
        read -r _ _ _ procs <<<"$($REPORT ticks "${PID[$s]}")"
        if ! start_idlers "$s" "$idle" "$idle_out"; then
            say "round $r $s $wl: could not open $idle idle connections, see $idle_out.log"
            settle "$s" "$procs"
            echo "$r,$s,$wl,0,0,0,0,0,0,0,0,0,0,idlers-failed,0,0,$conns,$idle,0" >>"$CSV"
            return
        fi
    fi
    quiet
    read -r c0 b0 all0 n0 <<<"$($REPORT ticks "${PID[$s]}")"
    t0=$(date +%s.%N)
    # fio's nbd engine opens one connection per job; group_reporting
    # merges the jobs' figures (and latency histograms) into one. A server
    # that accepts slowly (nbd-server: a backlog of 10) can drop a burst of
    # connections after the client saw them established, and the client
    # then waits for ever for a greeting, deaf to SIGTERM: a watchdog kills
    # fio and its jobs (each in a session of its own, so by pid) after
    # FIO_GRACE, which makes it a failed run; STAGGER_MS can spread the
    # connects.
    [ "$conns" -gt 1 ] && [ "$STAGGER_MS" -gt 0 ] &&
        stagger=(--startdelay="0-$(((conns - 1) * STAGGER_MS))ms")
    setsid "${CLIENT_PIN[@]}" fio --name="$wl" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --numjobs="$conns" --group_reporting --size="$IMG_BYTES" --time_based --runtime="$RUNTIME" \
        --ramp_time="$RAMP" --norandommap --randrepeat=0 --percentile_list=50:99:99.9 "${stagger[@]}" \
        --output-format=json --output="$out" >"$out.log" 2>&1 </dev/null &
    FIO_PID=$!
    setsid bash -c 'sleep "$1"; kill -KILL $(ps -o pid= --ppid "$2") "$2"' watchdog $((RAMP + RUNTIME + FIO_GRACE)) "$FIO_PID" \
        >/dev/null 2>&1 </dev/null &
    WATCHDOG=$!
    wait "$FIO_PID"
    rc=$?
    t1=$(date +%s.%N)
    kill -KILL -- -"$WATCHDOG" 2>/dev/null
    wait "$WATCHDOG" 2>/dev/null
    WATCHDOG=
    FIO_PID=
    # A forking server (nbd-server) serves the connection in a child; wait
    # for it to be reaped so its CPU shows up in the parent's cutime/cstime.
    for w in $(seq 20); do
        read -r c1 b1 all1 n1 <<<"$($REPORT ticks "${PID[$s]}")"
        [ "$n1" -le "$n0" ] && break
        sleep 0.1
    done
    if [ "$idle" -gt 0 ]; then
        stop_idlers
        idle_open=$(grep -o '"open":[0-9]*' "$idle_out" | cut -d: -f2)
        idle_open=${idle_open:-0}
        rm -f "$idle_out.ready"
        settle "$s" "$procs"
    fi
    if [ $rc -ne 0 ] || [ ! -s "$out" ]; then
        say "round $r $s $wl: fio failed (rc $rc), see $out.log"
        echo "$r,$s,$wl,0,0,0,0,0,0,0,0,0,0,fio-rc-$rc,0,0,$conns,$idle,$idle_open" >>"$CSV"
        return
    fi
    read -r iops mibps lat p99 fcpu ferr p50 p999 <<<"$($REPORT fio "$out")"
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
    echo "$r,$s,$wl,$iops,$mibps,$lat,$p99,$cpu,$per,$fcpu,$busy,$other,$wall,$ferr,$p50,$p999,$conns,$idle,$idle_open" >>"$CSV"
    say "$(printf 'round %d %-10s %-9s %9.0f IOPS %7.0f MiB/s  p99 %6.0f µs  server %3.0f%% of a core, %5.1f µs/op; others %3.0f%%' \
        "$r" "$s" "$wl" "$iops" "$mibps" "$p99" "$cpu" "$per" "$other")"
    if [ "$idle" -gt 0 ] && [ "$idle_open" -lt "$idle" ]; then
        say "round $r $s $wl: the server closed $((idle - idle_open)) of $idle idle connections"
    fi
}

# --- the run -----------------------------------------------------------------

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
say "results go to $OUT"
say "servers: ${ACTIVE[*]}; workloads: $WL_LIST; $ROUNDS rounds of ${RUNTIME}s (+${RAMP}s ramp)"

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
    for wl in $(round_order "$r"); do
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
    flexnbd | flexnbd-metrics) echo "flexnbd $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')" ;;
    flexnbd-base) echo "flexnbd-base: $("$FLEXNBD_BASE" --version 2>/dev/null | head -n1)" ;;
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
    echo "- $(fio --version): nbd engine, one job (one connection) per connection of the workload, ${RUNTIME}s + ${RAMP}s ramp per run; data: $IMG_BYTES bytes of random data in the page cache"
    echo "- servers: $(for s in "${ACTIVE[@]}"; do printf '%s; ' "$(version "$s")"; done | sed 's/; $//')"
    [ ${#SKIPPED[@]} -gt 0 ] && echo "- not installed, skipped: ${SKIPPED[*]}"
    echo "- load average before / after: $LOAD0 / $LOAD1"
    echo
    $REPORT report "$CSV"
    echo
    echo "Raw rows: $CSV"
} | tee "$OUT/summary.md"
exit 0
