#!/bin/bash
# scripts/bench-migrate.sh: how fast flexnbd migrates an export, and how
# long a client waits across the hand-off. Run through `make bench-migrate`.
#
# Workloads (see docs/BENCHMARKS.md, "Migration"):
#   random1g   1 GiB of random data: `flexnbd mirror --wait` from a serve to
#              a listen, timed from the mirror command until both have
#              exited, against nbdcopy of the same file into nbdkit's file
#              plugin (and nbdcopy --flush, which like the migration makes
#              the copy durable)
#   random1g-mem  the same, with both destination files in memory (MEM_DIR,
#              a tmpfs): no disk under the destinations, so the times
#              compare the copies themselves, the migration's FLUSH and
#              nbdcopy --flush costing nothing
#   sparse16g  a 16 GiB sparse file holding 64 MiB of random data in 64
#              pieces of 1 MiB, against dense64m, the same 64 MiB as one
#              file: migration time of each
#   stall      8 clients writing 4 KiB blocks (queue depth 1 each) to the
#              source while it migrates to a listen --then-serve; the
#              longest write any of them sees, reconnection and replay
#              included, and the freeze the source reports
#   stall-proxy  the same clients writing through a flexnbd proxy pointed
#              at the destination, then the source (`upstream DEST
#              SOURCE`): the clients never reconnect, the proxy does
#
# Every round measures each workload's subjects one after the other (the
# order rotates from one round to the next), so slow drift of a shared
# machine hits them alike; the report gives medians over the rounds and
# ratios measured within one round. Use a multiple of three rounds for
# random1g: the first large copy after some idle seconds can be much
# slower on a VM that hands free memory back to its host (see
# docs/BENCHMARKS.md), and rotation gives each subject that place alike.
#
# Environment:
#   ROUNDS=5              rounds
#   WORKLOADS="random1g random1g-mem sparse16g stall"
#   MEM_DIR=/dev/shm      where random1g-mem puts its destinations
#   NBDCOPY_FLUSH=1       also time nbdcopy --flush in random1g (0: skip)
#   VERIFY=1              compare the destination with the source after every
#                         copy (not timed); migload reads its blocks back
#   STALL_CONNS=8         client connections in stall
#   STALL_WARMUP=1        seconds the clients write before the migration
#   STALL_AFTER=1         seconds they go on writing to the destination
#   MIGRATE_TIMEOUT=300   seconds one migration or copy may take
#   QUIET_LIMIT=40        before each run, wait (up to QUIET_WAIT=30 seconds)
#                         until the machine is less busy than this (% of one
#                         core, summed over all cores); 0 disables
#   FLEXNBD_BENCH_DIR     results go to $FLEXNBD_BENCH_DIR/results/migrate-<time>
#                         (default ${TMPDIR:-/tmp}/flexnbd-bench)
#   FLEXNBD=bin/flexnbd   the binary under test
#
# The data (up to about 3.5 GiB at a time) lives in a temporary directory
# under ${TMPDIR:-/tmp} that is removed on exit, as is every process the
# script started.
#
# Exits 0 when the benchmark ran, whatever the numbers, and 1 when it could
# not run; a failed migration or copy is reported in its row.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TICKS="/usr/bin/python3 $ROOT/scripts/bench-report.py ticks"
REPORT="/usr/bin/python3 $ROOT/scripts/bench-migrate-report.py"
export PATH=$PATH:/usr/sbin:/sbin:/usr/local/go/bin

ROUNDS=${ROUNDS:-5}
WORKLOADS=${WORKLOADS:-"random1g random1g-mem sparse16g stall stall-proxy"}
MEM_DIR=${MEM_DIR:-/dev/shm}
NBDCOPY_FLUSH=${NBDCOPY_FLUSH:-1}
VERIFY=${VERIFY:-1}
STALL_CONNS=${STALL_CONNS:-8}
STALL_WARMUP=${STALL_WARMUP:-1}
STALL_AFTER=${STALL_AFTER:-1}
MIGRATE_TIMEOUT=${MIGRATE_TIMEOUT:-300}
QUIET_LIMIT=${QUIET_LIMIT:-40}
QUIET_WAIT=${QUIET_WAIT:-30}
BENCH_DIR=${FLEXNBD_BENCH_DIR:-${TMPDIR:-/tmp}/flexnbd-bench}
FLEXNBD=${FLEXNBD:-$ROOT/bin/flexnbd}
GO=${GO:-go}
HOST=127.0.0.1
START_TIMEOUT=20
STOP_TIMEOUT=10

INVOCATION="ROUNDS=$ROUNDS WORKLOADS=\"$WORKLOADS\" NBDCOPY_FLUSH=$NBDCOPY_FLUSH QUIET_LIMIT=$QUIET_LIMIT make bench-migrate"

say() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
fail() {
    say "error: $*"
    exit 1
}

for wl in $WORKLOADS; do
    case $wl in
    random1g | random1g-mem | sparse16g | stall | stall-proxy) ;;
    *) fail "unknown workload '$wl' (known: random1g random1g-mem sparse16g stall stall-proxy)" ;;
    esac
done
[ -x "$FLEXNBD" ] || fail "$FLEXNBD not found; run 'make build' or use 'make bench-migrate'"
for tool in nbdkit nbdcopy ss truncate setsid timeout "$GO"; do
    command -v "$tool" >/dev/null || fail "$tool is required"
done

# --- processes -------------------------------------------------------------

CHILDREN=() # every process started in the background, by pid
TMP=
MEMTMP=

cleanup() {
    local p alive t=0
    # A subshell that exits may run this trap too (bash lets it when the
    # subshell sets a trap of its own): only the script itself cleans up.
    [ "$BASHPID" = "$$" ] || return 0
    trap - EXIT INT TERM
    for p in "${CHILDREN[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    while :; do
        alive=
        for p in "${CHILDREN[@]}"; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        [ -z "$alive" ] && break
        if [ $t -ge $((STOP_TIMEOUT * 10)) ]; then
            say "still running after TERM; killing$alive"
            kill -KILL $alive 2>/dev/null || true
            break
        fi
        sleep 0.1
        t=$((t + 1))
    done
    wait 2>/dev/null || true
    [ -z "$TMP" ] || rm -rf "$TMP"
    [ -z "$MEMTMP" ] || rm -rf "$MEMTMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# spawn LOG CMD...: start CMD in its own session (a Ctrl-C reaches the
# script, which then stops it), its output in LOG; its pid is in SPAWNED.
SPAWNED=
spawn() {
    local log=$1
    shift
    setsid "$@" >"$log" 2>&1 </dev/null &
    SPAWNED=$!
    CHILDREN+=("$SPAWNED")
}

# reap PID TIMEOUT: wait for a spawned process to exit, killing it after
# TIMEOUT seconds; its exit status is in RC (137 when it was killed).
# The watchdog is a process group of its own, ended with SIGKILL: a bash
# subshell would run inherited traps if signalled right after its fork.
RC=0
reap() {
    local pid=$1 t=$2 dog p
    setsid bash -c 'sleep "$1" && kill -KILL "$2"' watchdog "$t" "$pid" </dev/null >/dev/null 2>&1 &
    dog=$!
    RC=0
    wait "$pid" || RC=$?
    kill -KILL -- -"$dog" 2>/dev/null || kill -KILL "$dog" 2>/dev/null || true
    wait "$dog" 2>/dev/null || true
    local keep=()
    for p in "${CHILDREN[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    CHILDREN=("${keep[@]}")
}

# run CMD...: run CMD to its end as a tracked child, its status in RC. The
# script waits with the wait builtin, which a signal interrupts, so that
# Ctrl-C stops a long migration at once.
run() {
    "$@" &
    local pid=$! p keep=()
    CHILDREN+=("$pid")
    RC=0
    wait "$pid" || RC=$?
    for p in "${CHILDREN[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    CHILDREN=("${keep[@]}")
}

# stop PID: TERM, then reap; RC as for reap.
stop() {
    kill -TERM "$1" 2>/dev/null || true
    reap "$1" "$STOP_TIMEOUT"
}

free_port() {
    /usr/bin/python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

# wait_for TEST...: poll until TEST succeeds, START_TIMEOUT at most.
wait_for() {
    local t=0
    until "$@"; do
        sleep 0.02
        t=$((t + 1))
        [ $t -lt $((START_TIMEOUT * 50)) ] || return 1
    done
}

is_socket() { [ -S "$1" ]; }
exists() { [ -e "$1" ]; }

# --- measuring -------------------------------------------------------------

# quiet: give unrelated work on a shared machine a chance to finish first
# (as scripts/bench.sh does). The run starts after QUIET_WAIT seconds
# whatever the load.
quiet() {
    local b0 b1 a0 a1 busy x deadline=$((SECONDS + QUIET_WAIT))
    [ "$QUIET_LIMIT" -gt 0 ] || return 0
    while :; do
        read -r x b0 a0 x <<<"$($TICKS $$)"
        sleep 0.5
        read -r x b1 a1 x <<<"$($TICKS $$)"
        busy=$(((b1 - b0) * 100 * $(nproc) / (a1 - a0 > 0 ? a1 - a0 : 1)))
        [ "$busy" -lt "$QUIET_LIMIT" ] && return 0
        if [ $SECONDS -ge $deadline ]; then
            say "machine still ${busy}% busy after ${QUIET_WAIT}s; running anyway"
            return 0
        fi
    done
}

# Around each timed run: the CPU of this script's process tree (the
# servers and clients it started, reaped ones included) and of the whole
# machine, so the report can show what else ran meanwhile.
T0=0
C0=0
B0=0
A0=0
mark_start() {
    local n
    read -r C0 B0 A0 n <<<"$($TICKS $$)"
    T0=$EPOCHREALTIME
}
# mark_end: sets WALL (seconds), CPU (% of one core used by our tree) and
# OTHERS (% used by the rest of the machine).
WALL=0
CPU=0
OTHERS=0
mark_end() {
    local t1=$EPOCHREALTIME c1 b1 a1 n
    read -r c1 b1 a1 n <<<"$($TICKS $$)"
    read -r WALL CPU OTHERS <<<"$(awk -v t0="$T0" -v t1="$t1" -v c="$((c1 - C0))" -v b="$((b1 - B0))" \
        -v all="$((a1 - A0))" -v hz="$(getconf CLK_TCK)" -v ncpu="$(nproc)" 'BEGIN {
            wall = t1 - t0
            cpu = wall > 0 ? c / hz / wall * 100 : 0
            busy = all > 0 ? b / all * 100 * ncpu : 0
            others = busy - cpu
            if (others < 0) others = 0
            printf "%.3f %.0f %.0f\n", wall, cpu, others
        }')"
}

row() { # round workload subject seconds mirror_ms freeze_ms copy_ms tail_ms error
    echo "$1,$2,$3,$4,$5,$6,$7,$8,$CPU,$OTHERS,$9" >>"$CSV"
}

# fresh PATH SIZE: an empty sparse file, as a new destination is.
fresh() {
    rm -f "$1"
    truncate -s "$2" "$1"
}

# check_copy SRC DST: with VERIFY, the copy must equal its source.
check_copy() {
    [ "$VERIFY" = 1 ] || return 0
    $REPORT same "$1" "$2"
}

# migrate ROUND WORKLOAD SUBJECT SRC [DIR]: one timed migration of SRC into
# a fresh file in DIR ($TMP by default), from `mirror --wait` until serve
# and listen have exited.
migrate() {
    local r=$1 wl=$2 subj=$3 src=$4 dst=${5:-$TMP}/dst.img log=$OUT/$2.$3.r$1 sport dport serve listen
    local err= mirror_ms= freeze_ms= copy_ms tail_ms rc_mirror rc_serve rc_listen size
    size=$(stat -c %s "$src")
    fresh "$dst" "$size"
    sync
    quiet
    sport=$(free_port)
    dport=$(free_port)
    while [ "$dport" = "$sport" ]; do dport=$(free_port); done
    rm -f "$TMP/ctl.sock"
    spawn "$log.listen.log" "$FLEXNBD" listen --addr "$HOST" --port "$dport" --file "$dst" -v
    listen=$SPAWNED
    spawn "$log.serve.log" "$FLEXNBD" serve --addr "$HOST" --port "$sport" --file "$src" --sock "$TMP/ctl.sock" -v
    serve=$SPAWNED
    if ! wait_for listening "$dport" || ! wait_for is_socket "$TMP/ctl.sock"; then
        stop "$serve"
        stop "$listen"
        CPU=0 OTHERS=0
        row "$r" "$wl" "$subj" 0 "" "" "" "" "did not start"
        say "round $r $wl $subj: serve or listen did not start; see $log.*.log"
        return
    fi
    mark_start
    run timeout "$MIGRATE_TIMEOUT" "$FLEXNBD" mirror --sock "$TMP/ctl.sock" --addr "$HOST" --port "$dport" --wait \
        >"$log.mirror.out" 2>"$log.mirror.err"
    rc_mirror=$RC
    if [ $rc_mirror = 0 ]; then
        reap "$serve" "$STOP_TIMEOUT" # it exits by itself after the hand-off
    else
        stop "$serve"
    fi
    rc_serve=$RC
    if [ $rc_mirror = 0 ]; then
        reap "$listen" "$STOP_TIMEOUT"
    else
        stop "$listen"
    fi
    rc_listen=$RC
    mark_end
    [ $rc_mirror = 0 ] || err="mirror exit $rc_mirror"
    [ $rc_serve = 0 ] || err="${err:+$err; }serve exit $rc_serve"
    [ $rc_listen = 0 ] || err="${err:+$err; }listen exit $rc_listen"
    mirror_ms=$(grep -o 'duration_ms=[0-9]*' "$log.mirror.out" | cut -d= -f2 || true)
    freeze_ms=$(grep 'hand-off complete' "$log.serve.log" | grep -o 'freeze=[0-9.]*' | cut -d= -f2 || true)
    if [ -z "$err" ] && ! check_copy "$src" "$dst"; then
        err="destination differs from the source"
    fi
    read -r copy_ms tail_ms <<<"$($REPORT split "$log.serve.log")"
    row "$r" "$wl" "$subj" "$WALL" "$mirror_ms" "$freeze_ms" "$copy_ms" "$tail_ms" "$err"
    say "$(printf 'round %d %-9s %-14s %7.3f s (mirror %s ms, freeze %s ms; CPU %s%%, others %s%%)%s' \
        "$r" "$wl" "$subj" "$WALL" "${mirror_ms:-?}" "${freeze_ms:-?}" "$CPU" "$OTHERS" "${err:+  ERROR: $err}")"
    rm -f "$dst"
}

# nbdcopy_run ROUND WORKLOAD SUBJECT SRC DIR [FLAGS]: nbdcopy of SRC into
# nbdkit's file plugin serving a fresh sparse file in DIR; times nbdcopy's
# run.
nbdcopy_run() {
    local r=$1 wl=$2 subj=$3 src=$4 dst=$5/nbdkit.img log=$OUT/$2.$3.r$1 port kit err= rc size
    shift 5
    size=$(stat -c %s "$src")
    fresh "$dst" "$size"
    sync
    quiet
    port=$(free_port)
    spawn "$log.nbdkit.log" nbdkit -f -i "$HOST" -p "$port" file "file=$dst"
    kit=$SPAWNED
    if ! wait_for listening "$port"; then
        stop "$kit"
        CPU=0 OTHERS=0
        row "$r" "$wl" "$subj" 0 "" "" "" "" "nbdkit did not start"
        say "round $r $wl $subj: nbdkit did not start; see $log.nbdkit.log"
        return
    fi
    mark_start
    run timeout "$MIGRATE_TIMEOUT" nbdcopy "$@" "$src" "nbd://$HOST:$port" >"$log.out" 2>&1
    rc=$RC
    mark_end
    stop "$kit"
    [ $rc = 0 ] || err="nbdcopy exit $rc"
    if [ -z "$err" ] && ! check_copy "$src" "$dst"; then
        err="destination differs from the source"
    fi
    row "$r" "$wl" "$subj" "$WALL" "" "" "" "" "$err"
    say "$(printf 'round %d %-9s %-14s %7.3f s (CPU %s%%, others %s%%)%s' \
        "$r" "$wl" "$subj" "$WALL" "$CPU" "$OTHERS" "${err:+  ERROR: $err}")"
    rm -f "$dst"
}

# stall_run ROUND [proxy]: one migration under client load; with proxy the
# clients write through a flexnbd proxy that moves them.
stall_run() {
    local r=$1 via=${2:-} src=$TMP/stall.img dst=$TMP/stall-dst.img log=$OUT/stall.r$1 sport dport serve listen load
    local err= rc_mirror rc_serve rc_listen rc_load freeze_log= freeze_reply= mirror_ms= csv=$STALL_CSV
    local pport proxy rc_proxy=0 addrs
    if [ -n "$via" ]; then
        log=$OUT/stall-proxy.r$1
        csv=$PSTALL_CSV
    fi
    fresh "$dst" "$(stat -c %s "$src")"
    sync
    quiet
    sport=$(free_port)
    dport=$(free_port)
    while [ "$dport" = "$sport" ]; do dport=$(free_port); done
    rm -f "$TMP/ctl.sock" "$TMP/ready"
    spawn "$log.listen.log" "$FLEXNBD" listen --addr "$HOST" --port "$dport" --file "$dst" --then-serve -v
    listen=$SPAWNED
    spawn "$log.serve.log" "$FLEXNBD" serve --addr "$HOST" --port "$sport" --file "$src" --sock "$TMP/ctl.sock" -v
    serve=$SPAWNED
    if ! wait_for listening "$dport" || ! wait_for is_socket "$TMP/ctl.sock"; then
        stop "$serve"
        stop "$listen"
        $REPORT stall-row "$r" /dev/null "" "" "" "did not start" >>"$csv"
        say "round $r stall: serve or listen did not start; see $log.*.log"
        return
    fi
    addrs="$HOST:$sport,$HOST:$dport"
    if [ -n "$via" ]; then
        pport=$(free_port)
        rm -f "$TMP/proxy.sock"
        spawn "$log.proxy.log" "$FLEXNBD" proxy --addr "$HOST" --port "$pport" --conn-addr "$HOST" \
            --conn-port "$sport" --sock "$TMP/proxy.sock" -v
        proxy=$SPAWNED
        if ! wait_for listening "$pport" || ! wait_for is_socket "$TMP/proxy.sock" ||
            ! "$FLEXNBD" upstream --sock "$TMP/proxy.sock" "$HOST:$dport" "$HOST:$sport" >/dev/null; then
            stop "$proxy"
            stop "$serve"
            stop "$listen"
            $REPORT stall-row "$r" /dev/null "" "" "" "proxy did not start" >>"$csv"
            say "round $r stall-proxy: the proxy did not start; see $log.proxy.log"
            return
        fi
        addrs="$HOST:$pport"
    fi
    # Not through spawn's log: the report is its standard output.
    setsid "$TMP/migload" -addrs "$addrs" -conns "$STALL_CONNS" -ready "$TMP/ready" \
        >"$log.migload.json" 2>"$log.migload.err" </dev/null &
    load=$!
    CHILDREN+=("$load")
    if ! wait_for exists "$TMP/ready"; then
        stop "$load"
        [ -z "$via" ] || stop "$proxy"
        stop "$serve"
        stop "$listen"
        $REPORT stall-row "$r" /dev/null "" "" "" "clients did not start" >>"$csv"
        say "round $r stall: the clients did not start; see $log.migload.err"
        return
    fi
    sleep "$STALL_WARMUP"
    kill -USR1 "$load" # phase "during"
    run timeout "$MIGRATE_TIMEOUT" "$FLEXNBD" mirror --sock "$TMP/ctl.sock" --addr "$HOST" --port "$dport" --wait \
        >"$log.mirror.out" 2>"$log.mirror.err"
    rc_mirror=$RC
    kill -USR1 "$load" # phase "after"
    if [ $rc_mirror = 0 ]; then
        reap "$serve" "$STOP_TIMEOUT"
    else
        stop "$serve"
    fi
    rc_serve=$RC
    sleep "$STALL_AFTER"
    kill -TERM "$load" 2>/dev/null || true
    reap "$load" 60 # it reads back what it wrote before it reports
    rc_load=$RC
    if [ -n "$via" ]; then
        stop "$proxy"
        rc_proxy=$RC
    fi
    stop "$listen"
    rc_listen=$RC
    [ $rc_mirror = 0 ] || err="mirror exit $rc_mirror"
    [ $rc_proxy = 0 ] || err="${err:+$err; }proxy exit $rc_proxy"
    [ $rc_serve = 0 ] || err="${err:+$err; }serve exit $rc_serve"
    [ $rc_listen = 0 ] || err="${err:+$err; }listen exit $rc_listen"
    [ $rc_load = 0 ] || err="${err:+$err; }migload exit $rc_load"
    mirror_ms=$(grep -o 'duration_ms=[0-9]*' "$log.mirror.out" | cut -d= -f2 || true)
    freeze_reply=$(grep -o 'freeze_ms=[0-9]*' "$log.mirror.out" | cut -d= -f2 || true)
    freeze_log=$(grep 'hand-off complete' "$log.serve.log" | grep -o 'freeze=[0-9.]*' | cut -d= -f2 || true)
    $REPORT stall-row "$r" "$log.migload.json" "$freeze_log" "$freeze_reply" "$mirror_ms" "$err" "${via:-direct}" >>"$csv"
    say "round $r stall${via:+-proxy}: $(tail -n1 "$csv" | $REPORT stall-say)"
}

# --- the run ---------------------------------------------------------------

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$BENCH_DIR/results/migrate-$STAMP
mkdir -p "$OUT" || fail "cannot create $OUT"
CSV=$OUT/raw.csv
STALL_CSV=$OUT/stall.csv
PSTALL_CSV=$OUT/stall-proxy.csv
echo "round,workload,subject,seconds,mirror_ms,freeze_ms,copy_ms,tail_ms,cpu_pct,others_pct,error" >"$CSV"
$REPORT stall-header >"$STALL_CSV"
$REPORT stall-header >"$PSTALL_CSV"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/flexnbd-bench-migrate.XXXXXX")
say "results go to $OUT; data in $TMP (removed at exit)"

has() { [[ " $WORKLOADS " == *" $1 "* ]]; }

if has stall || has stall-proxy; then
    say "building the load generator"
    (cd "$ROOT" && "$GO" build -o "$TMP/migload" ./internal/benchtools/migload) || fail "cannot build migload"
fi

say "creating the data"
if has random1g-mem; then
    MEMTMP=$(mktemp -d "$MEM_DIR/flexnbd-bench-migrate.XXXXXX") || fail "cannot make a directory in MEM_DIR=$MEM_DIR"
fi
if has random1g || has random1g-mem || has stall || has stall-proxy; then
    head -c 1G /dev/urandom >"$TMP/random1g.img"
fi
if has stall || has stall-proxy; then
    head -c 256M "$TMP/random1g.img" >"$TMP/stall.img"
fi
if has sparse16g; then
    head -c 64M /dev/urandom >"$TMP/dense64m.img"
    # The same 64 MiB, one MiB every 256 MiB of a 16 GiB file.
    truncate -s 16G "$TMP/sparse16g.img"
    for i in $(seq 0 63); do
        dd if="$TMP/dense64m.img" of="$TMP/sparse16g.img" bs=1M count=1 skip="$i" seek=$((i * 256)) \
            conv=notrunc status=none
    done
fi
sync
for f in random1g stall dense64m; do # into the page cache
    [ ! -f "$TMP/$f.img" ] || cat "$TMP/$f.img" >/dev/null
done

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for r in $(seq 1 "$ROUNDS"); do
    for wl in random1g random1g-mem; do
        has $wl || continue
        dir=$TMP
        [ $wl = random1g-mem ] && dir=$MEMTMP
        all=(flexnbd nbdcopy)
        [ "$NBDCOPY_FLUSH" = 1 ] && all+=(nbdcopy-flush)
        # Each subject takes each place in the order in turn.
        subjects=()
        for i in "${!all[@]}"; do subjects+=("${all[$(((i + r - 1) % ${#all[@]}))]}"); done
        for s in "${subjects[@]}"; do
            case $s in
            flexnbd) migrate "$r" $wl flexnbd "$TMP/random1g.img" "$dir" ;;
            nbdcopy) nbdcopy_run "$r" $wl nbdcopy "$TMP/random1g.img" "$dir" ;;
            nbdcopy-flush) nbdcopy_run "$r" $wl nbdcopy-flush "$TMP/random1g.img" "$dir" --flush ;;
            esac
        done
    done
    if has sparse16g; then
        subjects=(sparse16g dense64m)
        [ $((r % 2)) = 0 ] && subjects=(dense64m sparse16g)
        for s in "${subjects[@]}"; do
            migrate "$r" sparse16g "$s" "$TMP/$s.img"
        done
    fi
    if has stall; then
        stall_run "$r"
    fi
    if has stall-proxy; then
        stall_run "$r" proxy
    fi
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ----------------------------------------------------------------

{
    echo "## flexnbd migration benchmark, $DATE"
    echo
    echo "- command: \`$INVOCATION\` (scripts/bench-migrate.sh)"
    echo "- kernel: $(uname -r); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    echo "- flexnbd $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'); $(nbdkit --version | head -n1); $(nbdcopy --version | head -n1)"
    echo "- load average before / after: $LOAD0 / $LOAD1"
    echo
    $REPORT report "$CSV" "$STALL_CSV" "$PSTALL_CSV"
    echo
    echo "Raw rows and logs: $OUT"
} | tee "$OUT/summary.md"
exit 0
