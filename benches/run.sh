#!/usr/bin/env bash
# maintgate benchmarks, side by side with peers, on loopback.
#
#   benches/run.sh                 # full: every scenario, 5 rounds, 10k scale
#   benches/run.sh quick           # every scenario, short and small (smoke run)
#   benches/run.sh [quick|full] SCENARIO...
#
# Scenarios: bulk1 bulk8 iperf3 setup fairness shaped tunnels agents, and
# bulk1_up (client → target) when named.
# (iperf3 goes through proxytunnel in standalone mode as the entry)
#
# Paths compared: direct (loadgen → target), socat2 (two chained socat
# relays, the practical ceiling), maintgate (TLS client leg + CONNECT, the
# broker, the WSS agent link, the agent), maintgate-resume (setup only: TLS
# session resumed), maintgate-plain (the same product path with both legs
# plain: the broker's loopback-only plain_test_listen and a second agent on
# ws://; BENCH_PLAIN=0 leaves it out), rathole and bore (built by benches/build-peers.sh into
# benches/peers; skipped with a note when missing).
#
# Writes benches/results/<date>.md (the table) and <date>.jsonl (every
# result line). Needs: socat; iperf3 and proxytunnel for the iperf3 scenario;
# unshare and tc for the shaped one. Everything listens on loopback (the
# shaped scenario runs in its own network namespace).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SIZE=full
case "${1:-}" in
  quick|full) SIZE=$1; shift ;;
esac
ALL="bulk1 bulk8 iperf3 setup fairness shaped tunnels agents"
SCENARIOS="${*:-$ALL}"
for s in $SCENARIOS; do
  case " $ALL bulk1_up _shaped_inner " in *" $s "*) ;; *) echo "unknown scenario: $s (known: $ALL)" >&2; exit 2 ;; esac
done

if [ "$SIZE" = quick ]; then
  ROUNDS=2; BULK_SECS=1; WARM=0.3; SEQ=100; C64=500; FAIR_SECS=1.5; IPERF_SECS=1
  TUNNELS=1000; AGENTS=500; IDLE_SECS=5
else
  ROUNDS=5; BULK_SECS=3; WARM=0.5; SEQ=300; C64=3000; FAIR_SECS=4; IPERF_SECS=3
  TUNNELS=10000; AGENTS=10000; IDLE_SECS=60
fi
# Overrides for partial runs; BENCH_WINDOW sets the initial per-stream
# window (window_bytes) of both broker and agent, BENCH_LOWAT their link
# socket's TCP_NOTSENT_LOWAT (link_notsent_lowat_bytes; 0: kernel default),
# BENCH_MAX_WINDOW the most a window grows to (max_window_bytes);
# BENCH_SEQ and BENCH_C64 the setups per round (sequential, 64 concurrent);
# NO_PEERS=1 leaves rathole and bore out.
ROUNDS=${BENCH_ROUNDS:-$ROUNDS}; TUNNELS=${BENCH_TUNNELS:-$TUNNELS}
AGENTS=${BENCH_AGENTS:-$AGENTS}; IDLE_SECS=${BENCH_IDLE_SECS:-$IDLE_SECS}
SEQ=${BENCH_SEQ:-$SEQ}; C64=${BENCH_C64:-$C64}
# BENCH_PLAIN=0 leaves out the "maintgate-plain" path (the broker's
# loopback plain test listener and a second agent on ws://).
PLAIN=${BENCH_PLAIN:-1}
[ -n "${BENCH_INNER:-}" ] && PLAIN=0

# MAINTGATE_BIN: another maintgate binary to measure (a before/after
# comparison); the default is this tree's release build.
MG=${MAINTGATE_BIN:-$ROOT/target/release/maintgate}
# BENCH_THREADS: tokio worker threads of the broker and the agent (their
# TOKIO_WORKER_THREADS; default: one per core).
MG_ENV="${BENCH_THREADS:+TOKIO_WORKER_THREADS=$BENCH_THREADS}"
# BENCH_AGENT_THREADS: the agent's alone (default: BENCH_THREADS).
AGENT_THREADS=${BENCH_AGENT_THREADS:-${BENCH_THREADS:-}}
MG_AGENT_ENV="${AGENT_THREADS:+TOKIO_WORKER_THREADS=$AGENT_THREADS}"
# LOADGEN_BIN: another load generator binary (same use as MAINTGATE_BIN).
LG=${LOADGEN_BIN:-$ROOT/target/release/examples/loadgen}
PEERS=$ROOT/benches/peers/bin
DOMAIN=maint.bench
PASS=bench-Password-123
export LOADGEN_PASSWORD=$PASS

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# --------------------------------------------------------------- setup
if [ -z "${BENCH_INNER:-}" ]; then
  log "building release binaries"
  cargo build --release --bin maintgate --example loadgen 2>&1 | grep -E '^(error|warning)' >&2 || true
  [ -x "$MG" ] && [ -x "$LG" ] || { echo "build failed" >&2; exit 1; }
  STAMP=$(date +%Y-%m-%d-%H%M%S)
  mkdir -p "$ROOT/benches/results"
  export RESULTS=$ROOT/benches/results/$STAMP.jsonl
  export NOTES=$(mktemp /tmp/maintgate-bench-notes.XXXXXX)
  : > "$RESULTS"
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
note() { log "NOTE: $*"; printf -- '- %s\n' "$*" >> "$NOTES"; }

WORK=$(mktemp -d /tmp/maintgate-bench.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${BENCH_KEEP:-}" ]; then log "logs kept in $WORK"; else rm -rf "$WORK" "$WORK.rathole"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Start a background process; its pid is in $LAST.
spawn() { local name=$1; shift; "$@" > "$WORK/$name.log" 2>&1 & LAST=$!; PIDS+=("$LAST"); }

# Wait until a line matching $2 appears in log $1.
wait_log() {
  local i
  for i in $(seq 1 200); do grep -q "$2" "$WORK/$1.log" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1.log:" >&2; tail -5 "$WORK/$1.log" >&2; return 1
}

wait_port() {
  local i
  for i in $(seq 1 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2; return 1
}

wait_log_secs() {
  local i
  for i in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$WORK/$1.log" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out after $3 s waiting for '$2' in $1.log" >&2; return 1
}

# Append result lines (stdin) to the results; show them shortened.
record() { tee -a "$RESULTS" | cut -c1-240 >&2; }

# Where the agent finds the broker, and where the direct path finds the
# targets. The shaped scenario moves both onto the shaped address.
TARGET_BIND=127.0.0.1; BROKER_BIND=127.0.0.1; AGENT_BROKER_HOST=localhost; DIRECT_IP=127.0.0.1
if [ -n "${BENCH_INNER:-}" ]; then
  # Inside `unshare --net --mount`: a fresh network namespace, loopback
  # down until we raise it. Only traffic to or from 127.0.0.2 goes through
  # the 100 Mbit/s tbf: the agent link (the agent reaches the broker by a
  # name that /etc/hosts, bind-mounted privately, maps to 127.0.0.2), and
  # the direct path's flows (they connect to 127.0.0.2). The client's TLS
  # leg and the agent's dial to the target stay unshaped, so each path
  # crosses the shaped link exactly once.
  ip link set lo up
  # (prio, netem and fq_codel are missing from this kernel; htb and tbf are there)
  tc qdisc add dev lo root handle 1: htb default 20
  tc class add dev lo parent 1: classid 1:10 htb rate 100mbit ceil 100mbit burst 256kb cburst 256kb quantum 65536
  tc class add dev lo parent 1: classid 1:20 htb rate 50gbit ceil 50gbit quantum 65536
  tc qdisc add dev lo parent 1:10 handle 10: tbf rate 100mbit burst 256kb latency 50ms
  tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dst 127.0.0.2/32 flowid 1:10
  tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip src 127.0.0.2/32 flowid 1:10
  printf '127.0.0.1 localhost\n127.0.0.2 agentlink.%s\n' "$DOMAIN" > "$WORK/hosts"
  mount --bind "$WORK/hosts" /etc/hosts
  TARGET_BIND=0.0.0.0; BROKER_BIND=0.0.0.0; AGENT_BROKER_HOST=agentlink.$DOMAIN; DIRECT_IP=127.0.0.2
fi

read -r P_ECHO P_SINK P_SOURCE P_IPERF P_BROKER P_ADMIN \
        S_ECHO1 S_ECHO2 S_SINK1 S_SINK2 S_SRC1 S_SRC2 S_IPERF1 S_IPERF2 \
        R_CTL R_ECHO R_SINK R_SRC B_ECHO B_SINK B_SRC P_ENTRY P_PLAIN \
        < <("$LG" ports 23 | tr '\n' ' '; echo)

# --------------------------------------------------------------- topology
start_targets() {
  spawn target "$LG" serve --echo "$TARGET_BIND:$P_ECHO" --sink "$TARGET_BIND:$P_SINK" --source "$TARGET_BIND:$P_SOURCE"
  TARGET_PID=$LAST
  wait_log target '^source '
}

broker_config() {
  cat > "$WORK/broker.toml" <<EOF
listen = "$BROKER_BIND:$P_BROKER"
admin_listen = "127.0.0.1:$P_ADMIN"
domain = "$DOMAIN"
data_dir = "$WORK/data"
certs_dir = "$WORK/certs"
# The "maintgate-plain" path: CONNECT and a second agent's link, no TLS.
plain_test_listen = "127.0.0.1:$P_PLAIN"
[limits]
max_connections = 19000
max_connections_per_source = 19000
max_tunnels = 19000
max_tunnels_per_account = 19000
max_streams_per_agent = 16384
drain_timeout_ms = 2000
# The default 60 s password cache expires mid-run; 64 concurrent CONNECTs
# then miss it together, and the per-source hash budget answers some of
# them 407 (a finding of its own, reported separately). Keep runs steady.
auth_cache_ttl_secs = 3600
EOF
  [ -n "${BENCH_WINDOW:-}" ] && echo "window_bytes = $BENCH_WINDOW" >> "$WORK/broker.toml"
  [ -n "${BENCH_LOWAT:-}" ] && echo "link_notsent_lowat_bytes = $BENCH_LOWAT" >> "$WORK/broker.toml"
  [ -n "${BENCH_MAX_WINDOW:-}" ] && echo "max_window_bytes = $BENCH_MAX_WINDOW" >> "$WORK/broker.toml"
  return 0
}

BROKER_RUNS=0
start_broker() {
  BROKER_RUNS=$((BROKER_RUNS + 1))
  spawn "broker-$BROKER_RUNS" env $MG_ENV "$MG" --config "$WORK/broker.toml" serve
  BROKER_PID=$LAST
  wait_log "broker-$BROKER_RUNS" 'listening on'
}

start_agent() {
  spawn "agent-$BROKER_RUNS" env $MG_AGENT_ENV "$MG" agent --config "$WORK/agent.toml"
  AGENT_PID=$LAST
  "$LG" metric --admin "127.0.0.1:$P_ADMIN" --at-least 1 --timeout 20 > /dev/null
}

# A new broker and agent, so a scale scenario's memory figures are not
# skewed by heap the earlier scenarios left behind (the plain path's agent
# is not restarted: the scale scenarios count one agent).
fresh_broker_and_agent() {
  kill -TERM "$AGENT_PID" "$BROKER_PID" ${AGENT_PLAIN_PID:-} 2>/dev/null || true
  wait "$AGENT_PID" "$BROKER_PID" ${AGENT_PLAIN_PID:-} 2>/dev/null || true
  AGENT_PLAIN_PID=
  start_broker
  start_agent
}

start_stack() {
  start_targets
  broker_config
  "$MG" --data-dir "$WORK/data" account add bench --password-stdin <<< "$PASS" > /dev/null
  "$MG" --data-dir "$WORK/data" customer add 1234 --account bench --name "Bench" > /dev/null
  "$MG" --data-dir "$WORK/data" system add 1234 s1 --primary | tail -n 1 > "$WORK/agent.token"
  start_broker
  cat > "$WORK/agent.toml" <<EOF
broker = "wss://$AGENT_BROKER_HOST:$P_BROKER/agent"
ca = "$WORK/certs/ca.pem"
token_file = "$WORK/agent.token"
self_address = "127.0.0.1"
remote_access = true
services = [$P_ECHO, $P_SINK, $P_SOURCE, $P_IPERF]
max_streams = 16384
EOF
  [ -n "${BENCH_WINDOW:-}" ] && echo "window_bytes = $BENCH_WINDOW" >> "$WORK/agent.toml"
  [ -n "${BENCH_LOWAT:-}" ] && echo "link_notsent_lowat_bytes = $BENCH_LOWAT" >> "$WORK/agent.toml"
  [ -n "${BENCH_MAX_WINDOW:-}" ] && echo "max_window_bytes = $BENCH_MAX_WINDOW" >> "$WORK/agent.toml"
  start_agent
  PLAIN_PATH=""
  if [ "$PLAIN" = 1 ]; then
    # A second system of the same customer, its agent on ws:// to the
    # plain test listener: the product path with both legs plain.
    "$MG" --data-dir "$WORK/data" system add 1234 plain | tail -n 1 > "$WORK/agent-plain.token"
    sed -e "s|^broker = .*|broker = \"ws://127.0.0.1:$P_PLAIN/agent\"|" \
        -e "s|^token_file = .*|token_file = \"$WORK/agent-plain.token\"|" "$WORK/agent.toml" > "$WORK/agent-plain.toml"
    spawn agent-plain env $MG_AGENT_ENV "$MG" agent --config "$WORK/agent-plain.toml"
    AGENT_PLAIN_PID=$LAST
    "$LG" metric --admin "127.0.0.1:$P_ADMIN" --at-least 2 --timeout 20 > /dev/null
    PLAIN_PATH=maintgate-plain
  fi
  # socat: two chained relays per target.
  local pair
  for pair in "$S_ECHO1 $S_ECHO2 $P_ECHO" "$S_SINK1 $S_SINK2 $P_SINK" "$S_SRC1 $S_SRC2 $P_SOURCE" "$S_IPERF1 $S_IPERF2 $P_IPERF"; do
    set -- $pair
    # backlog: socat's default of 5 drops SYNs at 64 concurrent setups.
    spawn socat socat "TCP-LISTEN:$1,bind=127.0.0.1,reuseaddr,fork,backlog=1024" "TCP:127.0.0.1:$2,nodelay"
    spawn socat socat "TCP-LISTEN:$2,bind=127.0.0.1,reuseaddr,fork,backlog=1024" "TCP:127.0.0.1:$3,nodelay"
  done
  start_peers
  PATHS="direct socat2 maintgate $PLAIN_PATH $HAVE_PEERS"
  log "stack up: broker $BROKER_PID agent $AGENT_PID, paths: $PATHS"
}

HAVE_PEERS=""
start_peers() {
  HAVE_PEERS=""
  [ -n "${NO_PEERS:-}" ] && return 0
  if [ -x "$PEERS/rathole" ]; then
    # rathole watches its config's directory (recursively, via notify) for
    # hot reload: kept out of $WORK, every audit write of the broker under
    # $WORK/data would wake it and cost both sides an inotify event.
    RH=$WORK.rathole
    mkdir -p "$RH"
    cat > "$RH/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$R_CTL"
[server.services.echo]
token = "bench"
bind_addr = "127.0.0.1:$R_ECHO"
[server.services.sink]
token = "bench"
bind_addr = "127.0.0.1:$R_SINK"
[server.services.source]
token = "bench"
bind_addr = "127.0.0.1:$R_SRC"
EOF
    cat > "$RH/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$R_CTL"
[client.services.echo]
token = "bench"
local_addr = "127.0.0.1:$P_ECHO"
[client.services.sink]
token = "bench"
local_addr = "127.0.0.1:$P_SINK"
[client.services.source]
token = "bench"
local_addr = "127.0.0.1:$P_SOURCE"
EOF
    spawn rathole-server "$PEERS/rathole" --server "$RH/rathole-server.toml"
    RATHOLE_S=$LAST
    spawn rathole-client "$PEERS/rathole" --client "$RH/rathole-client.toml"
    RATHOLE_C=$LAST
    if wait_port "$R_ECHO" && wait_port "$R_SRC" && wait_port "$R_SINK"; then
      HAVE_PEERS="$HAVE_PEERS rathole"
    else
      note "rathole did not come up; skipped"
    fi
  else
    [ -n "${BENCH_INNER:-}" ] || note "rathole not built ($PEERS/rathole missing; run benches/build-peers.sh): skipped"
  fi
  if [ -x "$PEERS/bore" ]; then
    if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
      note "bore: its fixed control port 7835 is taken; skipped"
    else
      spawn bore-server "$PEERS/bore" server --min-port 1024 --max-port 65535
      BORE_S=$LAST
      wait_port 7835
      BORE_C=""
      local pair
      for pair in "echo $P_ECHO $B_ECHO" "sink $P_SINK $B_SINK" "source $P_SOURCE $B_SRC"; do
        set -- $pair
        spawn "bore-$1" "$PEERS/bore" local "$2" --local-host 127.0.0.1 --to 127.0.0.1 --port "$3"
        BORE_C="$BORE_C,bore_$1=$LAST"
      done
      if wait_port "$B_ECHO" && wait_port "$B_SINK" && wait_port "$B_SRC"; then
        HAVE_PEERS="$HAVE_PEERS bore"
      else
        note "bore did not come up; skipped"
      fi
    fi
  else
    [ -n "${BENCH_INNER:-}" ] || note "bore not built ($PEERS/bore missing; run benches/build-peers.sh): skipped"
  fi
}

# "ADDR [DEST]": where path $1 connects to reach target kind $2
# (echo|sink|source), and the CONNECT destination on the broker path.
hop() {
  local port s1 r b
  case $2 in
    echo) port=$P_ECHO; s1=$S_ECHO1; r=$R_ECHO; b=$B_ECHO ;;
    sink) port=$P_SINK; s1=$S_SINK1; r=$R_SINK; b=$B_SINK ;;
    source) port=$P_SOURCE; s1=$S_SRC1; r=$R_SRC; b=$B_SRC ;;
  esac
  case $1 in
    direct) echo "$DIRECT_IP:$port" ;;
    socat2) echo "127.0.0.1:$s1" ;;
    rathole) echo "127.0.0.1:$r" ;;
    bore) echo "127.0.0.1:$b" ;;
    maintgate-plain) echo "127.0.0.1:$P_PLAIN 1234-plain.$DOMAIN:$port" ;;
    maintgate*) echo "localhost:$P_BROKER 1234.$DOMAIN:$port" ;;
  esac
}

# loadgen arguments reaching target kind $2 over path $1.
path_args() {
  local addr dest
  read -r addr dest <<< "$(hop "$1" "$2")"
  printf -- '--addr %s' "$addr"
  [ -n "$dest" ] && printf -- ' --connect %s --ca %s --user bench' "$dest" "$WORK/certs/ca.pem"
  # "maintgate": a full TLS 1.3 handshake per connection, as a new
  # client makes; "maintgate-resume": the session is resumed.
  [ "$1" = maintgate ] && printf -- ' --no-resume'
  # "maintgate-plain": the broker's plain test listener, no TLS at all.
  [ "$1" = maintgate-plain ] && printf -- ' --plain-connect'
  echo
}

# Arguments for bulk streams (to the source) beside an echo on path $1.
bulk_args() {
  local addr dest
  read -r addr dest <<< "$(hop "$1" source)"
  printf -- '--bulk-addr %s' "$addr"
  [ -n "$dest" ] && printf -- ' --bulk-connect %s' "$dest"
  echo
}

# Processes to watch on path $1.
watch_for() {
  local w="target=$TARGET_PID"
  case $1 in
    maintgate-plain) w="$w,broker=$BROKER_PID,agent=$AGENT_PLAIN_PID" ;;
    maintgate*) w="$w,broker=$BROKER_PID,agent=$AGENT_PID" ;;
    socat2) ;; # socat forks per connection; its children are not watched
    rathole) w="$w,rathole_server=$RATHOLE_S,rathole_client=$RATHOLE_C" ;;
    bore) w="$w,bore_server=$BORE_S$BORE_C" ;;
  esac
  echo "$w"
}

tags() { echo "--tag scenario=$1 --tag path=$2 --tag round=$3"; }

run_lg() {
  # run_lg SCENARIO PATH ROUND MODE ARGS...
  local sc=$1 p=$2 r=$3; shift 3
  local mode=$1; shift
  if ! "$LG" "$mode" $(tags "$sc" "$p" "$r") --watch "$(watch_for "$p")" "$@" | record > /dev/null; then
    note "$sc/$p round $r failed (see the log)"
  fi
}

# --------------------------------------------------------------- scenarios
sc_bulk() {
  local name=$1 streams=$2 dir=$3 kind=$4 r p
  for r in $(seq 1 "$ROUNDS"); do
    for p in $PATHS; do
      log "$name round $r: $p"
      run_lg "$name" "$p" "$r" bulk $(path_args "$p" "$kind") --streams "$streams" --dir "$dir" \
        --seconds "$BULK_SECS" --warmup "$WARM"
    done
  done
}

sc_setup() {
  local r p
  for r in $(seq 1 "$ROUNDS"); do
    for p in $PATHS maintgate-resume; do
      log "setup round $r: $p"
      run_lg setup_seq "$p" "$r" setup $(path_args "$p" echo) --count "$SEQ" --concurrency 1
      run_lg setup_c64 "$p" "$r" setup $(path_args "$p" echo) --count "$C64" --concurrency 64
    done
  done
}

sc_fairness() {
  local sc=${1:-fair} r p
  for r in $(seq 1 "$ROUNDS"); do
    for p in $PATHS; do
      if [ "$sc" = fair ] && { [ "$p" = direct ] || [ "$p" = maintgate ]; }; then
        log "echo alone round $r: $p"
        run_lg echo_alone "$p" "$r" echo $(path_args "$p" echo) --seconds "$FAIR_SECS" --rate 200
      fi
      log "$sc round $r: $p"
      run_lg "$sc" "$p" "$r" echo $(path_args "$p" echo) $(bulk_args "$p") \
        --bulk-streams 1 --seconds "$FAIR_SECS" --rate 200
    done
  done
}

sc_iperf3() {
  # The entry is proxytunnel in standalone mode (TLS to the broker, then
  # CONNECT), what engineers run. stunnel's `protocol = connect` cannot
  # serve: it sends the CONNECT in clear text and then runs TLS end to end
  # through the tunnel (RFC 2817), while the broker wants TLS first.
  if ! command -v iperf3 > /dev/null || ! command -v proxytunnel > /dev/null; then
    note "iperf3 or proxytunnel missing (apt-get install iperf3 proxytunnel): iperf3 scenario skipped"
    return 0
  fi
  spawn iperf3 iperf3 -s -B 127.0.0.1 -p "$P_IPERF"
  wait_port "$P_IPERF"
  # With -q proxytunnel stays in the foreground; should it daemonize,
  # the process listening on the port is the one to stop.
  spawn proxytunnel proxytunnel -q -a "$P_ENTRY" -E -C "$WORK/certs/ca.pem" -p "localhost:$P_BROKER" \
    -P "bench:$PASS" -d "1234.$DOMAIN:$P_IPERF"
  wait_port "$P_ENTRY"
  local pt_pid
  pt_pid=$(ss -ltnpH "sport = :$P_ENTRY" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
  [ -n "$pt_pid" ] && PIDS+=("$pt_pid")
  local r p port
  for r in $(seq 1 "$ROUNDS"); do
    for p in direct socat2 maintgate; do
      case $p in
        direct) port=$P_IPERF ;;
        socat2) port=$S_IPERF1 ;;
        maintgate) port=$P_ENTRY ;;
      esac
      log "iperf3 round $r: $p"
      if ! iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_SECS" -J > "$WORK/iperf.json" 2> "$WORK/iperf.err" ||
         grep -q '"error"' "$WORK/iperf.json"; then
        note "iperf3 over $p round $r failed: $(head -c 200 "$WORK/iperf.err") $(grep -m1 '"error"' "$WORK/iperf.json" || true)"
        continue
      fi
      "$LG" ingest-iperf $(tags iperf3 "$p" "$r") < "$WORK/iperf.json" 2> "$WORK/iperf.err" | record > /dev/null ||
        note "iperf3 over $p round $r failed: $(head -n 1 "$WORK/iperf.err")"
    done
  done
}

sc_tunnels() {
  fresh_broker_and_agent
  log "tunnels: $TUNNELS idle tunnels over one agent (full TLS handshakes, 64 at a time)"
  spawn hold "$LG" hold $(path_args maintgate echo) --count "$TUNNELS" --concurrency 64 \
    --watch "broker=$BROKER_PID,agent=$AGENT_PID" --tag scenario=tunnels --tag path=maintgate --tag round=1
  local hold_pid=$LAST
  if wait_log_secs hold '"event":"up"' 120; then
    sleep 2
    # RSS once settled: broker and agent while the tunnels are held.
    "$LG" cpu --seconds 1 --watch "broker=$BROKER_PID,agent=$AGENT_PID" \
      --tag scenario=tunnels --tag step=settled | record > /dev/null
  else
    note "tunnels: the hold never reported all up"
  fi
  kill -TERM "$hold_pid"
  wait "$hold_pid" || true
  grep '^{' "$WORK/hold.log" | record > /dev/null || note "tunnels: no result from the hold"
}

sc_agents() {
  fresh_broker_and_agent
  log "agents: provisioning $AGENTS systems"
  "$LG" provision --data-dir "$WORK/data" --customer 1234 --prefix a --count "$AGENTS" --tokens-out "$WORK/tokens.txt" \
    --tag scenario=agents --tag step=provision | record > /dev/null
  sleep 1.5 # the broker notices the store change and revalidates once
  "$LG" cpu --seconds 2 --watch "broker=$BROKER_PID" --tag scenario=agents --tag step=before | record > /dev/null
  local base=1 # the bench stack's own agent
  spawn agents "$LG" agents --tokens "$WORK/tokens.txt" --broker "wss://localhost:$P_BROKER/agent" \
    --ca "$WORK/certs/ca.pem" --services "$P_ECHO" --ramp-per-sec 2000 \
    --tag scenario=agents --tag step=agents-process
  local agents_pid=$LAST
  log "agents: waiting for $AGENTS agents to connect"
  "$LG" metric --admin "127.0.0.1:$P_ADMIN" --at-least $((AGENTS + base)) --timeout 120 \
    --tag scenario=agents --tag step=connect --tag agents="$AGENTS" | record > /dev/null
  sleep 2
  log "agents: measuring keepalive CPU over $IDLE_SECS s"
  "$LG" cpu --seconds "$IDLE_SECS" --watch "broker=$BROKER_PID,agents=$agents_pid" \
    --tag scenario=agents --tag step=idle --tag agents="$AGENTS" | record > /dev/null
  log "agents: restarting the broker (reconnect storm)"
  local t0 t1
  t0=$(date +%s.%N)
  kill -TERM "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
  t1=$(date +%s.%N)
  BROKER_RUNS=$((BROKER_RUNS + 1))
  spawn "broker-$BROKER_RUNS" env $MG_ENV "$MG" --config "$WORK/broker.toml" serve
  BROKER_PID=$LAST
  "$LG" metric --admin "127.0.0.1:$P_ADMIN" --at-least $((AGENTS + base)) --timeout 60 \
    --tag scenario=agents --tag step=storm --tag agents="$AGENTS" \
    --tag shutdown_s="$(awk "BEGIN { printf \"%.3f\", $t1 - $t0 }")" | record > /dev/null
  kill -TERM "$agents_pid"; wait "$agents_pid" 2>/dev/null || true
  grep '^{' "$WORK/agents.log" | record > /dev/null || true
}

sc_shaped_inner() {
  start_stack_min
  local r p
  for r in $(seq 1 "$ROUNDS"); do
    for p in direct maintgate; do
      log "shaped round $r: $p"
      run_lg shaped_bulk1 "$p" "$r" bulk $(path_args "$p" source) --seconds "$BULK_SECS" --warmup "$WARM"
      # "direct" here is two independent TCP flows on the shaped link.
      run_lg fair_shaped "$p" "$r" echo $(path_args "$p" echo) $(bulk_args "$p") \
        --bulk-streams 1 --seconds "$FAIR_SECS" --rate 200
    done
  done
}

start_stack_min() {
  NO_PEERS=1 start_stack
}

sc_shaped() {
  if ! command -v unshare > /dev/null || ! command -v tc > /dev/null; then
    note "unshare or tc missing: shaped fairness skipped"; return 0
  fi
  log "shaped: re-running inside unshare --net --mount with tbf 100mbit on the agent link"
  if ! BENCH_INNER=1 RESULTS=$RESULTS NOTES=$NOTES unshare --net --mount "$0" "$SIZE" _shaped_inner; then
    note "shaped scenario failed inside unshare --net --mount (namespaces unavailable?)"
  fi
}

# --------------------------------------------------------------- main
if [ -n "${BENCH_INNER:-}" ]; then
  for s in $SCENARIOS; do
    [ "$s" = _shaped_inner ] && sc_shaped_inner
  done
  exit 0
fi

start_stack
printf '{"mode":"meta","date":"%s","size":"%s","rounds":%s,"machine":"%s, %s cores, %s","maintgate":"%s","binary":"%s","window_bytes":"%s","peers":"%s"}\n' \
  "$(date -Is)" "$SIZE" "$ROUNDS" "$(uname -sr)" "$(nproc)" "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo)" \
  "$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" "$MG" "${BENCH_WINDOW:-default}" "${HAVE_PEERS:-none}" >> "$RESULTS"

T0=$(date +%s)
for s in $SCENARIOS; do
  case $s in
    bulk1) sc_bulk bulk1 1 down source ;;
    bulk1_up) sc_bulk bulk1_up 1 up sink ;;
    bulk8) sc_bulk bulk8 8 down source ;;
    iperf3) sc_iperf3 ;;
    setup) sc_setup ;;
    fairness) sc_fairness fair ;;
    shaped) sc_shaped ;;
    tunnels) sc_tunnels ;;
    agents) sc_agents ;;
  esac
done
log "scenarios took $(( $(date +%s) - T0 )) s"

MD=${RESULTS%.jsonl}.md
[ "$SIZE" = quick ] && printf -- '- quick run: short durations, %s rounds, %s tunnels, %s agents; a smoke test of the scripts, not a measurement.\n' "$ROUNDS" "$TUNNELS" "$AGENTS" >> "$NOTES"
"$LG" report "$RESULTS" --notes "$NOTES" --command "benches/run.sh $SIZE${*:+ $*}" > "$MD"
rm -f "$NOTES"
log "wrote $MD"
echo "$MD"
