#!/usr/bin/env bash
# shellcheck shell=bash
#
# scripts/lib/servers.sh — install and run throw-away RabbitMQ / PostgreSQL servers for idem's
# end-to-end tests and demo.
#
# Source it (`. scripts/lib/servers.sh`); it defines functions and starts nothing by itself.
#
# Why it looks the way it does (docs/test-servers.md says it at length):
#   * The machines have no systemd and no Docker, so servers run as plain background processes,
#     bound to 127.0.0.1 only, with all of their state in a `mktemp -d` directory, and are stopped
#     by the PIDs we recorded — never by name, so a developer's own servers are never touched.
#   * PostgreSQL refuses to run as root and RabbitMQ expects its own user, so both run as their
#     package users (`postgres`, `rabbitmq`) through `runuser`.
#   * Ports are chosen by the caller (defaults 5673 / 5433 in scripts/test) so tests do not collide
#     with a server a developer already runs on 5672 / 5432; a busy port is a hard, explained error.
#
# Public functions (all print progress on stderr prefixed with "[idem-servers]"):
#   idem_install_packages [rabbitmq] [postgres]
#   idem_start_rabbitmq PORT [URL_VAR]     exports IDEM_RABBITMQ_NODE, IDEM_RABBITMQCTL, URL_VAR
#                                          (URL_VAR defaults to IDEM_TEST_AMQP_URL)
#   idem_rabbitmqctl ARGS...               rabbitmqctl -n "$IDEM_RABBITMQ_NODE" ARGS..., done right
#   idem_start_rabbitmq_cluster BASE_PORT [URLS_VAR]
#                                          3 clustered nodes on BASE_PORT..BASE_PORT+2; exports
#                                          IDEM_CLUSTER_DIR, IDEM_CLUSTER_NODES, URLS_VAR (default
#                                          IDEM_TEST_CLUSTER_AMQP_URLS)
#   idem_start_postgres PORT [URL_VAR]     exports IDEM_PGCTL, URL_VAR (URL_VAR defaults to
#                                          IDEM_TEST_DATABASE_URL)
#   idem_stop_servers                      stops whatever this shell started; idempotent
#   idem_stop_servers_on_exit              trap idem_stop_servers on EXIT (and INT/TERM/HUP)
#
# One RabbitMQ node, one RabbitMQ cluster and one PostgreSQL server per sourcing shell.

# Guard against being sourced twice (the state variables below would be reset).
if [[ -n "${IDEM__SERVERS_SH_LOADED:-}" ]]; then
    # shellcheck disable=SC2317  # exit only if executed instead of sourced
    return 0 2>/dev/null || exit 0
fi
IDEM__SERVERS_SH_LOADED=1

# The Debian packages' real entry points. /usr/sbin/rabbitmq-server is a wrapper that, when run
# as the rabbitmq user, redirects all output to /var/log/rabbitmq/startup_log (shared with the
# packaged service) — so we call the scripts in /usr/lib/rabbitmq/bin directly.
IDEM__RMQ_BIN=/usr/lib/rabbitmq/bin
# The rabbitmq user's home holds the Erlang cookie that both our node and every CLI call use.
# Using the package's default cookie (not a private one) means a plain `rabbitmqctl -n NODE …`
# run as root also works: Debian's /usr/sbin/rabbitmqctl wrapper `su`s to rabbitmq, whose HOME is
# this directory.
IDEM__RMQ_HOME=/var/lib/rabbitmq
# RABBITMQ_NODE_IP_ADDRESS only covers AMQP; without this the Erlang distribution listener (the
# node's and each CLI call's) binds 0.0.0.0.
IDEM__ERL_LOOPBACK_DIST='-kernel inet_dist_use_interface {127,0,0,1}'

# State of what *this shell* started. Only these are ever stopped.
# A node's PIDs are in files in its dir (launcher.pid, rabbitmq.pid), not here: tests restart
# nodes through the dir's executables, and a stop must find the node as they left it.
IDEM__RMQ_DIR=""        # temp dir (mnesia, logs, config, executables)
IDEM__RMQ_NODE=""       # Erlang node name
IDEM__RMQC_DIR=""       # the cluster's temp dir: node1/ node2/ node3/, each laid out like IDEM__RMQ_DIR
IDEM__RMQC_NODES=()     # the cluster's node names, in that order
IDEM__PG_DIR=""         # temp dir (data/, socket, logs)
IDEM__PG_BIN=""
IDEM__PG_PID=""         # postmaster PID

idem__log() { printf '[idem-servers] %s\n' "$*" >&2; }
idem__die() { printf '[idem-servers] ERROR: %s\n' "$*" >&2; return 1; }

# Run a command as USER. We are normally root (runuser); if we already are that user, run directly.
idem__as() {
    local user=$1; shift
    if [[ "$(id -un)" == "$user" ]]; then
        "$@"
    elif [[ $EUID -eq 0 ]]; then
        runuser -u "$user" -- "$@"
    else
        idem__die "need to run '$1' as user '$user': run this script as root (or as '$user')"
    fi
}

# True if something accepts TCP connections on 127.0.0.1:PORT. (A listener on 0.0.0.0 or on
# 127.0.0.1 both block our bind; /dev/tcp needs no extra tools such as ss/netstat.)
idem__port_in_use() {
    timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Fail with a message naming the knob to turn if PORT is taken.
idem__require_free_port() {
    local port=$1 what=$2 knob=$3
    if idem__port_in_use "$port"; then
        local who=""
        if command -v ss >/dev/null 2>&1; then
            who=$(ss -Hltnp "sport = :$port" 2>/dev/null | head -n 3)
        fi
        idem__die "port $port ($what) is already in use on 127.0.0.1${who:+:
$who}
  → pick another port with $knob=<port> (or stop whatever is listening there)"
        return 1
    fi
}

# Print the last lines of the given files (for startup failures).
idem__tail_logs() {
    local f
    for f in "$@"; do
        [[ -f "$f" ]] || continue
        printf '[idem-servers] ---- last lines of %s ----\n' "$f" >&2
        tail -n 40 "$f" >&2 || true
    done
}

# Process helpers read /proc directly: minimal machines may lack procps (pgrep/ps), and neither
# package pulls it in.

# PIDs of processes owned by USER, sorted, one per line.
idem__pids_of_user() {
    local uid d
    uid=$(id -u "$1" 2>/dev/null) || return 0
    for d in /proc/[0-9]*; do
        if [[ "$(stat -c %u "$d" 2>/dev/null)" == "$uid" ]]; then echo "${d#/proc/}"; fi
    done | sort
    return 0
}

# Direct children of PID.
idem__children() {
    local want=$1 f line ppid
    for f in /proc/[0-9]*/stat; do
        # The process may have gone meanwhile. (`read`, not `$(<"$f")`: under `set -e` a failing
        # $(<file) ends bash 5.2 itself, even in a `|| continue`.)
        { read -r line <"$f"; } 2>/dev/null || continue
        # "pid (comm) state ppid …" — comm may contain spaces and parentheses
        read -r _ ppid _ <<<"${line##*) }"
        if [[ "$ppid" == "$want" ]]; then f=${f#/proc/}; echo "${f%/stat}"; fi
    done
    return 0
}

# All descendants of PID (recursively), one per line.
idem__descendants() {
    local child
    for child in $(idem__children "$1"); do
        echo "$child"
        idem__descendants "$child"
    done
    return 0
}

# True if PID is a live process. A zombie counts as dead (kill -0 would say alive): it has exited
# and only waits for its parent to reap it.
idem__alive() {
    local stat
    [[ "$1" =~ ^[0-9]+$ ]] || return 1
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1   # not $(<…): see idem__children
    stat=${stat##*) }
    [[ "${stat%% *}" != Z ]]
}

# idem__pid_from_file FILE NAME... — the PID in FILE if that process is alive and its name is one
# of NAMEs; else nothing. (Pid files outlive killed processes, and PIDs get reused.)
idem__pid_from_file() {
    local file=$1 pid comm name
    shift
    pid=$(cat "$file" 2>/dev/null) || return 0
    idem__alive "$pid" || return 0
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 0
    for name in "$@"; do
        if [[ "$comm" == "$name" ]]; then echo "$pid"; return 0; fi
    done
    return 0
}

# The beam.smp of the node in DIR (it writes rabbitmq.pid as it boots), if running.
idem__rmq_beam_pid() { idem__pid_from_file "$1/rabbitmq.pid" beam.smp; }

# The process DIR/start launched (runuser, or, as the rabbitmq user, the rabbitmq-server sh; for
# an instant setsid or env), if it still runs.
idem__rmq_launcher_pid() {
    idem__pid_from_file "$1/launcher.pid" runuser rabbitmq-server setsid env
}

# idem__rmq_wait_gone PID PORT NODE SECONDS — wait until PID is gone, nothing listens on PORT and
# epmd has forgotten NODE (a start before that fails with "node name already in use").
idem__rmq_wait_gone() {
    local pid=$1 port=$2 name=${3%@*} deadline=$((SECONDS + $4))
    while idem__alive "$pid" || idem__port_in_use "$port" ||
        epmd -names 2>/dev/null | grep -q "^name $name at port"; do
        (( SECONDS < deadline )) || return 1
        sleep 0.1
    done
}

# A node with NODE's name still registered in epmd (a leftover from a killed run) would make ours
# fail with a confusing "node name already in use".
idem__require_free_node_name() {
    local node=$1 knob=$2
    if command -v epmd >/dev/null 2>&1 && epmd -names 2>/dev/null | grep -q "^name ${node%@*} at port"; then
        idem__die "an Erlang node named $node is already running (leftover from an earlier run?); stop it, or use another $knob"
        return 1
    fi
}

idem__pg_bin_dir() {
    # Highest installed PostgreSQL major version (Debian layout /usr/lib/postgresql/<ver>/bin).
    local d
    d=$(for d in /usr/lib/postgresql/*/bin; do if [[ -x "$d/initdb" ]]; then echo "$d"; fi; done | sort -V | tail -n 1)
    [[ -n "$d" ]] || { idem__die "no PostgreSQL found in /usr/lib/postgresql/*/bin (run idem_install_packages)"; return 1; }
    echo "$d"
}

# ---------------------------------------------------------------------------------------------
# idem_install_packages [rabbitmq] [postgres]
#
# Installs the Debian packages that are missing (default: both). The packages' maintainer scripts
# try to start the system-wide services (port 5672 / 5432, data in /var/lib); we neither want nor
# need those, so during the install we put a policy-rc.d that forbids service starts (the standard
# Debian mechanism, unless one is already in place) and afterwards stop anything new that still
# got started — but only processes that did not exist before the install.
# ---------------------------------------------------------------------------------------------
idem_install_packages() {
    local want=("$@")
    [[ ${#want[@]} -gt 0 ]] || want=(rabbitmq postgres)

    local pkgs=() w
    for w in "${want[@]}"; do
        case "$w" in
            rabbitmq)
                if [[ ! -x /usr/sbin/rabbitmq-server || ! -x /usr/sbin/rabbitmqctl || ! -x "$IDEM__RMQ_BIN/rabbitmq-server" ]]; then
                    pkgs+=(rabbitmq-server)
                fi ;;
            postgres)
                if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
                    pkgs+=(postgresql)
                fi ;;
            *) idem__die "idem_install_packages: unknown component '$w' (use rabbitmq, postgres)"; return 1 ;;
        esac
    done

    if [[ ${#pkgs[@]} -eq 0 ]]; then
        idem__log "packages already installed (${want[*]})"
        return 0
    fi
    [[ $EUID -eq 0 ]] || { idem__die "missing packages: ${pkgs[*]}; installing them needs root (apt-get)"; return 1; }

    # Processes that belong to the package users before the install: never touched.
    local before_rmq before_pg
    before_rmq=$(idem__pids_of_user rabbitmq)
    before_pg=$(idem__pids_of_user postgres)

    # Forbid service starts from maintainer scripts (invoke-rc.d honours exit code 101).
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# temporary, written by idem scripts/lib/servers.sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi

    local rc=0
    idem__log "installing: ${pkgs[*]} (apt-get update + apt-get install; takes about a minute)"
    idem__log "+ apt-get update"
    apt-get update || rc=$?
    if [[ $rc -eq 0 ]]; then
        idem__log "+ DEBIAN_FRONTEND=noninteractive apt-get install -y ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}" || rc=$?
    fi
    [[ -z "$made_policy" ]] || rm -f "$policy"
    [[ $rc -eq 0 ]] || { idem__die "apt-get failed (exit $rc) installing ${pkgs[*]}"; return 1; }

    # Anything the packages started anyway (no policy-rc.d honoured, or a postinst that starts
    # things directly): stop it politely through the package's own tooling, then by PID.
    local new_rmq new_pg pid
    new_rmq=$(comm -13 <(echo "$before_rmq") <(idem__pids_of_user rabbitmq) | grep . || true)
    new_pg=$(comm -13 <(echo "$before_pg") <(idem__pids_of_user postgres) | grep . || true)
    if [[ -n "$new_rmq" ]]; then
        idem__log "the rabbitmq-server package started processes (${new_rmq//$'\n'/ }); stopping them"
        (cd / && idem__as rabbitmq env HOME="$IDEM__RMQ_HOME" "$IDEM__RMQ_BIN/rabbitmqctl" stop) >/dev/null 2>&1 || true
        for pid in $new_rmq; do
            # epmd is harmless and may be shared; leave it.
            [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == epmd ]] && continue
            kill -TERM "$pid" 2>/dev/null || true
        done
    fi
    if [[ -n "$new_pg" ]]; then
        idem__log "the postgresql package started a cluster (${new_pg//$'\n'/ }); stopping it"
        if command -v pg_lsclusters >/dev/null 2>&1; then
            local ver name
            while read -r ver name _; do
                pg_ctlcluster "$ver" "$name" stop -m fast >/dev/null 2>&1 || true
            done < <(pg_lsclusters -h 2>/dev/null || true)
        fi
        for pid in $new_pg; do kill -TERM "$pid" 2>/dev/null || true; done
    fi
    idem__log "installed: ${pkgs[*]}"
}

# ---------------------------------------------------------------------------------------------
# idem_rabbitmqctl ARGS...
#
# rabbitmqctl against the node started by idem_start_rabbitmq. The CLI authenticates with the
# Erlang cookie of the user running it, so it runs as `rabbitmq` with HOME=/var/lib/rabbitmq — the
# same cookie the node uses. ERL_EPMD_ADDRESS keeps an epmd the CLI might spawn on loopback.
# Examples: idem_rabbitmqctl close_all_connections "test"; idem_rabbitmqctl stop_app;
#           idem_rabbitmqctl start_app; idem_rabbitmqctl list_queues name messages
# ---------------------------------------------------------------------------------------------
idem_rabbitmqctl() {
    local node=${IDEM__RMQ_NODE:-${IDEM_RABBITMQ_NODE:-}}
    [[ -n "$node" ]] || { idem__die "idem_rabbitmqctl: no node (start one with idem_start_rabbitmq, or set IDEM_RABBITMQ_NODE)"; return 1; }
    # cd: the Erlang CLI wants a readable cwd, and the caller's may be root-only.
    (cd "$IDEM__RMQ_HOME" && idem__as rabbitmq env HOME="$IDEM__RMQ_HOME" ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_CTL_ERL_ARGS="$IDEM__ERL_LOOPBACK_DIST" "$IDEM__RMQ_BIN/rabbitmqctl" -n "$node" "$@")
}

# ---------------------------------------------------------------------------------------------
# idem__rmq_prepare_node DIR NODE PORT DIST_PORT
#
# Lays out the directory of one throw-away node (DIR must exist): its config, mnesia/, log/, and
# four executables, because a test (Rust's Command) can't call a shell function:
#   DIR/rabbitmqctl ARGS...  rabbitmqctl -n NODE ARGS..., as the rabbitmq user (owner of the cookie)
#   DIR/start   boots the node in the background (again, after a stop or kill: same data, same
#               environment) and returns once it has fully booted — for a cluster member that
#               includes rejoining the cluster. Timeout IDEM_RABBITMQ_START_TIMEOUT (default 120 s).
#   DIR/stop    graceful `rabbitmqctl stop`; returns once the node is down and its port closed
#   DIR/kill    SIGKILL to the node's beam.smp; returns once it is gone and its port closed
# start/stop/kill exit 1, saying why (with log tails), if the node is not in the state they
# expect (start: down; stop, kill: running) or does not get there in time.
# ---------------------------------------------------------------------------------------------
idem__rmq_prepare_node() {
    local dir=$1 node=$2 port=$3 dist_port=$4
    mkdir -p "$dir/mnesia" "$dir/log" || return 1
    # No plugins: the management plugin alone adds seconds to every boot and tests don't need it.
    printf '[].\n' >"$dir/enabled_plugins"
    # An empty env file so /etc/rabbitmq/rabbitmq-env.conf (a developer's NODENAME, etc.) can't leak in.
    : >"$dir/rabbitmq-env.conf"
    cat >"$dir/rabbitmq.conf" <<EOF
# written by idem scripts/lib/servers.sh — a throw-away test node
# guest may only log in over loopback (the default, stated here on purpose)
loopback_users.guest = true
# logs go to files in this directory, not to the console
log.console = false
log.file.level = info
# The real memory bound on one message: lapin assembles a whole body before idem can check its
# size (max_body_bytes), so the broker must refuse what is too large to hold (16 MiB).
max_message_size = 16777216
EOF
    chown -R rabbitmq:rabbitmq "$dir" || return 1

    cat >"$dir/rabbitmqctl" <<EOF
#!/bin/sh
# rabbitmqctl against the idem test node $node (as the rabbitmq user, which owns the cookie)
cd "$IDEM__RMQ_HOME" || exit 1
as=""
[ "\$(id -un)" = rabbitmq ] || as="runuser -u rabbitmq --"
exec \$as env HOME="$IDEM__RMQ_HOME" ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_CTL_ERL_ARGS="$IDEM__ERL_LOOPBACK_DIST" \\
    "$IDEM__RMQ_BIN/rabbitmqctl" -n "$node" "\$@"
EOF

    # start/stop/kill: this node's parameters, then the helpers of this file they use (copied in
    # with `declare -f`, so there is one definition of each), then the script proper.
    local vars
    printf -v vars 'dir=%q\nnode=%q\nport=%q\ndist_port=%q\nrmq_bin=%q\nrmq_home=%q\nerl_dist_args=%q\n%s' \
        "$dir" "$node" "$port" "$dist_port" "$IDEM__RMQ_BIN" "$IDEM__RMQ_HOME" "$IDEM__ERL_LOOPBACK_DIST" \
        "$(declare -f idem__log idem__alive idem__pid_from_file idem__rmq_beam_pid \
            idem__rmq_launcher_pid idem__port_in_use idem__rmq_wait_gone idem__tail_logs)"
    local head='#!/bin/bash\n# %s the idem test RabbitMQ node %s (written by scripts/lib/servers.sh)\n%s\n'

    # The bodies are scripts of their own, expanded when they run (SC2016); $head is a format.
    # shellcheck disable=SC2016,SC2059
    {
        printf "$head" 'Boot (again)' "$node" "$vars"
        cat <<'EOF'
timeout=${IDEM_RABBITMQ_START_TIMEOUT:-120}
beam=$(idem__rmq_beam_pid "$dir")
if [[ -n "$beam" ]]; then
    idem__log "RabbitMQ node $node is already running (beam pid $beam)"
    exit 1
fi
if idem__port_in_use "$port"; then
    idem__log "cannot start RabbitMQ node $node: 127.0.0.1:$port is in use (node still going down?)"
    exit 1
fi
# After a kill the old pid file is left behind; the node writes a new one as it boots.
rm -f "$dir/rabbitmq.pid"
as=()
[[ "$(id -un)" == rabbitmq ]] || as=(runuser -u rabbitmq --)

idem__log "starting RabbitMQ node $node on 127.0.0.1:$port (dist port $dist_port, dir $dir)"
started=$SECONDS
# env -i: a clean environment, so nothing from the caller (RABBITMQ_*, ERL_*) changes the node.
# setsid: own session, so a Ctrl-C at the terminal reaches our caller's trap, not the broker.
# All three std streams go to files: a caller reading our output (Command::output()) must not
# wait for the broker to close them.
(
    cd "$dir" || exit 1
    exec setsid "${as[@]}" env -i \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME="$rmq_home" \
        LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        RABBITMQ_NODENAME="$node" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$port" \
        RABBITMQ_DIST_PORT="$dist_port" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="$erl_dist_args" \
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$dir/mnesia" \
        RABBITMQ_LOG_BASE="$dir/log" \
        RABBITMQ_LOGS="$dir/log/rabbit.log" \
        RABBITMQ_PID_FILE="$dir/rabbitmq.pid" \
        "$rmq_bin/rabbitmq-server"
) </dev/null >>"$dir/log/server.out" 2>&1 &
launcher=$!
# For whoever stops the node later: the root of the process tree to kill if `stop` can't.
echo "$launcher" >"$dir/launcher.pid"

# Wait for the AMQP listener with a cheap bash probe (each rabbitmqctl call boots an Erlang VM,
# ~1 s of CPU that the booting node would have to share on a 2-core machine), bailing out
# early if the server died; then `await_startup` confirms the boot has fully completed (the
# listener opens a moment before that).
deadline=$((SECONDS + timeout)) failed=""
until idem__port_in_use "$port"; do
    if ! idem__alive "$launcher"; then
        failed="exited during startup"; break
    fi
    if (( SECONDS >= deadline )); then
        failed="did not open its AMQP port within ${timeout}s (IDEM_RABBITMQ_START_TIMEOUT)"; break
    fi
    sleep 0.25
done
if [[ -z "$failed" ]]; then
    left=$((deadline - SECONDS))
    (( left >= 5 )) || left=5
    if ! "$dir/rabbitmqctl" await_startup --timeout "$left" >"$dir/log/await_startup.out" 2>&1; then
        failed="did not finish booting (rabbitmqctl await_startup failed)"
    fi
fi
if [[ -n "$failed" ]]; then
    idem__log "RabbitMQ node $node $failed"
    idem__tail_logs "$dir/log/server.out" "$dir/log/rabbit.log" "$dir/log/await_startup.out"
    exit 1
fi
idem__log "RabbitMQ node $node is up after $((SECONDS - started))s (beam pid $(idem__rmq_beam_pid "$dir"))"
EOF
    } >"$dir/start"

    # shellcheck disable=SC2016,SC2059
    {
        printf "$head" 'Stop (gracefully)' "$node" "$vars"
        cat <<'EOF'
beam=$(idem__rmq_beam_pid "$dir")
if [[ -z "$beam" ]]; then
    idem__log "RabbitMQ node $node is not running"
    exit 1
fi
idem__log "stopping RabbitMQ node $node"
# `stop` returns once the node has agreed to halt, not once it is gone: hence the wait after it.
if ! timeout 60 "$dir/rabbitmqctl" stop >"$dir/log/stop.out" 2>&1; then
    idem__log "rabbitmqctl stop failed for RabbitMQ node $node"
    idem__tail_logs "$dir/log/stop.out" "$dir/log/rabbit.log"
    exit 1
fi
if ! idem__rmq_wait_gone "$beam" "$port" "$node" 60; then
    idem__log "RabbitMQ node $node still runs (or 127.0.0.1:$port is still open) 60s after rabbitmqctl stop"
    idem__tail_logs "$dir/log/rabbit.log"
    exit 1
fi
idem__log "RabbitMQ node $node is down"
EOF
    } >"$dir/stop"

    # shellcheck disable=SC2016,SC2059
    {
        printf "$head" 'SIGKILL' "$node" "$vars"
        cat <<'EOF'
beam=$(idem__rmq_beam_pid "$dir")
if [[ -z "$beam" ]]; then
    idem__log "RabbitMQ node $node is not running"
    exit 1
fi
kill -KILL "$beam"
# The rabbitmq-server sh and runuser above it exit by themselves once beam.smp is gone.
if ! idem__rmq_wait_gone "$beam" "$port" "$node" 30; then
    idem__log "RabbitMQ node $node (beam pid $beam) still there 30s after SIGKILL"
    exit 1
fi
idem__log "RabbitMQ node $node killed (beam pid $beam)"
EOF
    } >"$dir/kill"

    chmod 755 "$dir/rabbitmqctl" "$dir/start" "$dir/stop" "$dir/kill"
    chmod 711 "$dir"   # so a non-root test process could still exec the scripts
}

# idem__rmq_stop_node DIR NODE GRACE_SECONDS
#
# Stops a node laid out by idem__rmq_prepare_node, however it was last started (by us or by a
# test through DIR/start): `rabbitmqctl stop` (at most GRACE_SECONDS), then SIGKILL to whatever is
# left of the process tree its last start launched. No-op if nothing of it runs.
idem__rmq_stop_node() {
    local dir=$1 node=$2 grace=$3 beam launcher pids
    beam=$(idem__rmq_beam_pid "$dir")
    launcher=$(idem__rmq_launcher_pid "$dir")
    [[ -n "$beam$launcher" ]] || return 0
    idem__log "stopping RabbitMQ node $node"
    if [[ -n "$beam" ]]; then
        # `stop` returns once the node has agreed to halt; give it a moment to actually exit.
        timeout "$grace" "$dir/rabbitmqctl" stop >/dev/null 2>&1 || true
        for _ in $(seq 1 50); do
            idem__alive "$beam" || idem__alive "$launcher" || break
            sleep 0.2
        done
    fi
    if idem__alive "$beam" || idem__alive "$launcher"; then
        # Still there (e.g. it never finished booting, so `stop` could not reach it): kill the
        # process tree — runuser → rabbitmq-server sh → beam.smp → helpers.
        pids=""
        [[ -z "$launcher" ]] || pids=$(idem__descendants "$launcher")
        pids="$beam $launcher ${pids//$'\n'/ }"
        idem__log "RabbitMQ node $node did not stop cleanly; killing pids $pids"
        # shellcheck disable=SC2086  # a list of PIDs, split on purpose
        kill -KILL $pids 2>/dev/null || true
        for _ in $(seq 1 25); do
            idem__alive "$beam" || idem__alive "$launcher" || break
            sleep 0.2
        done
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------
# idem_start_rabbitmq PORT [URL_VAR]
#
# Starts a private RabbitMQ node `idem-PORT@localhost`: AMQP on 127.0.0.1:PORT, Erlang
# distribution on 127.0.0.1:(PORT+20000) (override: IDEM_RABBITMQ_DIST_PORT), epmd on loopback, no
# plugins, all state in a temp dir. Waits until the broker is fully booted (timeout
# IDEM_RABBITMQ_START_TIMEOUT, default 120 s). The default `guest` user works over 127.0.0.1.
# Exports:
#   IDEM_RABBITMQ_NODE  node name, for `rabbitmqctl -n`
#   IDEM_RABBITMQCTL    path to an executable that runs rabbitmqctl against this node correctly
#                       (as the rabbitmq user, right cookie) — for tests: "$IDEM_RABBITMQCTL" stop_app
#   URL_VAR             (default IDEM_TEST_AMQP_URL) = amqp://guest:guest@127.0.0.1:PORT/%2f
# (The node's dir also holds start/stop/kill executables, see idem__rmq_prepare_node.)
# ---------------------------------------------------------------------------------------------
idem_start_rabbitmq() {
    local port=${1:?usage: idem_start_rabbitmq PORT [URL_VAR]}
    local url_var=${2:-IDEM_TEST_AMQP_URL}
    local knob=${IDEM__PORT_KNOB_AMQP:-IDEM_TEST_AMQP_PORT}
    [[ "$port" =~ ^[0-9]+$ ]] || { idem__die "idem_start_rabbitmq: bad port '$port'"; return 1; }
    [[ -z "$IDEM__RMQ_NODE" ]] || { idem__die "a RabbitMQ node ($IDEM__RMQ_NODE) is already running from this shell"; return 1; }
    [[ -x "$IDEM__RMQ_BIN/rabbitmq-server" ]] || { idem__die "RabbitMQ is not installed (run idem_install_packages rabbitmq)"; return 1; }

    local dist_port=${IDEM_RABBITMQ_DIST_PORT:-$((port + 20000))}
    local node="idem-$port@localhost"
    idem__require_free_port "$port" "AMQP" "$knob" || return 1
    idem__require_free_port "$dist_port" "Erlang distribution for $node" "IDEM_RABBITMQ_DIST_PORT (default: AMQP port + 20000) or $knob" || return 1
    idem__require_free_node_name "$node" "$knob" || return 1

    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/idem-rabbitmq-$port.XXXXXX")
    IDEM__RMQ_DIR=$dir
    IDEM__RMQ_NODE=$node
    # The timeout may be a plain (unexported) variable of the calling script.
    if ! idem__rmq_prepare_node "$dir" "$node" "$port" "$dist_port" ||
        ! IDEM_RABBITMQ_START_TIMEOUT=${IDEM_RABBITMQ_START_TIMEOUT:-120} "$dir/start"; then
        idem_stop_rabbitmq
        return 1
    fi

    export IDEM_RABBITMQ_NODE="$node"
    export IDEM_RABBITMQCTL="$dir/rabbitmqctl"
    printf -v "$url_var" '%s' "amqp://guest:guest@127.0.0.1:$port/%2f"
    export "${url_var?}"
}

# Stop the node started by idem_start_rabbitmq (no-op if none). Graceful `rabbitmqctl stop`
# first, then signals to the PIDs it recorded.
idem_stop_rabbitmq() {
    [[ -n "$IDEM__RMQ_DIR" ]] || return 0
    local dir=$IDEM__RMQ_DIR
    idem__rmq_stop_node "$dir" "$IDEM__RMQ_NODE" 60
    if [[ -d "$dir" && "$dir" == */idem-rabbitmq-* ]]; then
        rm -rf "$dir"
    fi
    IDEM__RMQ_DIR="" IDEM__RMQ_NODE=""
    unset IDEM_RABBITMQ_NODE IDEM_RABBITMQCTL
}

# ---------------------------------------------------------------------------------------------
# idem_start_rabbitmq_cluster BASE_PORT [URLS_VAR]
#
# Starts a private 3-node RabbitMQ cluster for failover tests: nodes `idem-c<PORT>@localhost` with
# AMQP on 127.0.0.1:BASE_PORT, BASE_PORT+1, BASE_PORT+2 and Erlang distribution on each port
# + 20000, each configured like idem_start_rabbitmq's node, all state in one temp dir
# (node1/ node2/ node3/). Boots the three, joins node2 and node3 to node1, and checks that
# cluster_status lists all three as running. Independent of idem_start_rabbitmq: both can run
# side by side (they share epmd, as every Erlang node on the machine does).
# Exports:
#   URLS_VAR            (default IDEM_TEST_CLUSTER_AMQP_URLS) the three AMQP URLs, comma-separated,
#                       in node order: amqp://guest:guest@127.0.0.1:PORT/%2f,...
#   IDEM_CLUSTER_DIR    the temp dir; IDEM_CLUSTER_DIR/nodeN/{rabbitmqctl,start,stop,kill} are the
#                       levers for tests (see idem__rmq_prepare_node)
#   IDEM_CLUSTER_NODES  the three node names, space-separated, in node order
# ---------------------------------------------------------------------------------------------
idem_start_rabbitmq_cluster() {
    local base=${1:?usage: idem_start_rabbitmq_cluster BASE_PORT [URLS_VAR]}
    local urls_var=${2:-IDEM_TEST_CLUSTER_AMQP_URLS}
    # (a caller with a port variable of its own names it here, as scripts/demo does for the node)
    local knob=${IDEM__PORT_KNOB_CLUSTER:-"idem_start_rabbitmq_cluster's BASE_PORT"}
    [[ "$base" =~ ^[0-9]+$ ]] || { idem__die "idem_start_rabbitmq_cluster: bad port '$base'"; return 1; }
    [[ -z "$IDEM__RMQC_DIR" ]] || { idem__die "a RabbitMQ cluster ($IDEM__RMQC_DIR) is already running from this shell"; return 1; }
    [[ -x "$IDEM__RMQ_BIN/rabbitmq-server" ]] || { idem__die "RabbitMQ is not installed (run idem_install_packages rabbitmq)"; return 1; }

    local i port node nodes=() urls=()
    for i in 0 1 2; do
        port=$((base + i))
        node="idem-c$port@localhost"
        idem__require_free_port "$port" "AMQP of cluster node $node" "$knob" || return 1
        idem__require_free_port "$((port + 20000))" "Erlang distribution of cluster node $node" "$knob" || return 1
        idem__require_free_node_name "$node" "$knob" || return 1
        nodes+=("$node")
        urls+=("amqp://guest:guest@127.0.0.1:$port/%2f")
    done

    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/idem-rabbitmq-cluster-$base.XXXXXX")
    chmod 711 "$dir"   # so a non-root test process could still exec nodeN/*
    IDEM__RMQC_DIR=$dir
    IDEM__RMQC_NODES=("${nodes[@]}")
    for i in 0 1 2; do
        if ! idem__rmq_prepare_node "$dir/node$((i + 1))" "${nodes[i]}" "$((base + i))" "$((base + i + 20000))"; then
            idem_stop_rabbitmq_cluster
            return 1
        fi
    done

    idem__log "starting a 3-node RabbitMQ cluster (${nodes[*]}) in $dir"
    local started=$SECONDS
    # The three boot at once: until they are joined they are independent nodes, and booting in
    # parallel is what makes the cluster affordable on 2 cores (most of a boot is waiting).
    local pids=() failed=""
    for i in 1 2 3; do
        IDEM_RABBITMQ_START_TIMEOUT=${IDEM_RABBITMQ_START_TIMEOUT:-120} "$dir/node$i/start" &
        pids+=($!)
    done
    for i in 0 1 2; do
        wait "${pids[i]}" || failed+=" ${nodes[i]}"
    done
    # On failure: logs, then cleanup, then the error (idem__die last: under `set -e` it ends the
    # caller, whose EXIT trap would clean up too).
    if [[ -n "$failed" ]]; then
        idem_stop_rabbitmq_cluster
        idem__die "RabbitMQ cluster: node(s)$failed failed to boot (log tails above)"
        return 1
    fi

    # One at a time: two joins racing for node1's schema is asking for trouble.
    local n
    for i in 2 3; do
        n="$dir/node$i"
        idem__log "joining ${nodes[i - 1]} to ${nodes[0]}"
        if ! { "$n/rabbitmqctl" stop_app && "$n/rabbitmqctl" join_cluster "${nodes[0]}" &&
                "$n/rabbitmqctl" start_app; } >"$n/log/join.out" 2>&1; then
            idem__tail_logs "$n/log/join.out" "$n/log/rabbit.log" "$dir/node1/log/rabbit.log"
            idem_stop_rabbitmq_cluster
            idem__die "RabbitMQ cluster: ${nodes[i - 1]} failed to join ${nodes[0]} (log tails above)"
            return 1
        fi
    done

    # Every node must see all three running.
    local status running missing=""
    for i in 1 2 3; do
        status=$("$dir/node$i/rabbitmqctl" cluster_status --formatter json 2>&1) || true
        # {"running_nodes":["idem-c5690@localhost",...],...} — no jq on minimal machines
        running=$(sed -n 's/.*"running_nodes":\[\([^]]*\)\].*/\1/p' <<<"$status")
        for node in "${nodes[@]}"; do
            [[ "$running" == *"\"$node\""* ]] || missing+=" $node (seen from ${nodes[i - 1]})"
        done
        if [[ -n "$missing" ]]; then
            idem__tail_logs "$dir"/node{1,2,3}/log/rabbit.log
            idem_stop_rabbitmq_cluster
            idem__die "RabbitMQ cluster: not all nodes are running members:$missing
cluster_status of ${nodes[i - 1]}: $status"
            return 1
        fi
    done
    idem__log "RabbitMQ cluster is up after $((SECONDS - started))s: ${nodes[*]}"

    export IDEM_CLUSTER_DIR="$dir"
    export IDEM_CLUSTER_NODES="${nodes[*]}"
    local joined
    printf -v joined '%s,' "${urls[@]}"
    printf -v "$urls_var" '%s' "${joined%,}"
    export "${urls_var?}"
}

# Stop the cluster started by idem_start_rabbitmq_cluster (no-op if none), whatever state tests
# left its nodes in: the three at once, each `rabbitmqctl stop` (15 s at most), then SIGKILL.
idem_stop_rabbitmq_cluster() {
    [[ -n "$IDEM__RMQC_DIR" ]] || return 0
    local dir=$IDEM__RMQC_DIR i pids=()
    for i in 1 2 3; do
        [[ -d "$dir/node$i" ]] || continue
        idem__rmq_stop_node "$dir/node$i" "${IDEM__RMQC_NODES[i - 1]:-node$i}" 15 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || true; done
    if [[ -d "$dir" && "$dir" == */idem-rabbitmq-cluster-* ]]; then
        rm -rf "$dir"
    fi
    IDEM__RMQC_DIR="" IDEM__RMQC_NODES=()
    unset IDEM_CLUSTER_DIR IDEM_CLUSTER_NODES
}

# ---------------------------------------------------------------------------------------------
# idem_start_postgres PORT [URL_VAR]
#
# initdb (trust auth, superuser `postgres`) into a temp dir and start the highest installed
# PostgreSQL on 127.0.0.1:PORT (Unix socket inside the temp dir), then create database idem_test.
# fsync stays on: the per-message cost measured in tests should match a real deployment.
# Exports:
#   IDEM_PGCTL  path to an executable that runs pg_ctl against this server (as the postgres
#               user, with the data dir, options, port, socket dir and log of the start, and
#               `-m fast -w -t 60`) — for tests: "$IDEM_PGCTL" restart (or status, stop, start)
#   URL_VAR     (default IDEM_TEST_DATABASE_URL) = postgres://postgres@127.0.0.1:PORT/idem_test
# ---------------------------------------------------------------------------------------------
idem_start_postgres() {
    local port=${1:?usage: idem_start_postgres PORT [URL_VAR]}
    local url_var=${2:-IDEM_TEST_DATABASE_URL}
    local knob=${IDEM__PORT_KNOB_PG:-IDEM_TEST_PG_PORT}
    [[ "$port" =~ ^[0-9]+$ ]] || { idem__die "idem_start_postgres: bad port '$port'"; return 1; }
    [[ -z "$IDEM__PG_DIR" ]] || { idem__die "a PostgreSQL server ($IDEM__PG_DIR) is already running from this shell"; return 1; }
    local bin
    bin=$(idem__pg_bin_dir) || return 1
    idem__require_free_port "$port" "PostgreSQL" "$knob" || return 1

    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/idem-pg-$port.XXXXXX")
    chown postgres:postgres "$dir"
    IDEM__PG_DIR=$dir
    IDEM__PG_BIN=$bin
    local data="$dir/data"

    idem__log "initdb $data ($bin)"
    local started=$SECONDS
    # --no-sync: the cluster is thrown away, no need to fsync initdb's files. C locale: no
    # dependency on which locales the machine has generated.
    if ! (cd "$dir" && idem__as postgres "$bin/initdb" -D "$data" --auth=trust -U postgres \
            -E UTF8 --locale=C --no-sync) >"$dir/initdb.log" 2>&1; then
        idem__log "initdb failed"
        idem__tail_logs "$dir/initdb.log"
        idem_stop_postgres
        return 1
    fi

    # A tiny executable for tests (Rust's Command can't call a shell function): pg_ctl with the
    # options of the start below, so `"$IDEM_PGCTL" restart` brings back this very server.
    local opts="-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=on -c max_connections=200"
    local ctl="$dir/pg_ctl"
    cat >"$ctl" <<EOF
#!/bin/sh
# pg_ctl against the idem test PostgreSQL on 127.0.0.1:$port (as the postgres user, which owns
# the data directory). Usage: \$0 restart|status|stop|start
cd "$dir" || exit 1
as=""
[ "\$(id -un)" = postgres ] || as="runuser -u postgres --"
exec \$as "$bin/pg_ctl" -D "$data" -o "$opts" -l "$dir/postgres.log" -m fast -w -t 60 "\$@"
EOF
    chmod 755 "$ctl"
    chmod 711 "$dir"   # so a non-root test process could still exec $dir/pg_ctl

    idem__log "starting PostgreSQL on 127.0.0.1:$port"
    # pg_ctl -w waits until the server accepts connections; the postmaster runs in its own
    # session (pg_ctl calls setsid), detached from our terminal.
    if ! (cd "$dir" && idem__as postgres "$bin/pg_ctl" -D "$data" -o "$opts" \
            -l "$dir/postgres.log" -w -t 60 start) >"$dir/pg_ctl.log" 2>&1; then
        idem__log "PostgreSQL failed to start"
        idem__tail_logs "$dir/pg_ctl.log" "$dir/postgres.log"
        idem_stop_postgres
        return 1
    fi
    IDEM__PG_PID=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)

    if ! "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres idem_test >>"$dir/pg_ctl.log" 2>&1; then
        idem__log "createdb idem_test failed"
        idem__tail_logs "$dir/pg_ctl.log" "$dir/postgres.log"
        idem_stop_postgres
        return 1
    fi
    idem__log "PostgreSQL is up after $((SECONDS - started))s (postmaster pid ${IDEM__PG_PID:-?}, dir $dir)"

    export IDEM_PGCTL="$ctl"
    printf -v "$url_var" '%s' "postgres://postgres@127.0.0.1:$port/idem_test"
    export "${url_var?}"
}

# Stop the server started by idem_start_postgres (no-op if none).
idem_stop_postgres() {
    [[ -n "$IDEM__PG_DIR" ]] || return 0
    local dir=$IDEM__PG_DIR pid=$IDEM__PG_PID
    # After a "$IDEM_PGCTL" restart the PID recorded at start is stale: postmaster.pid names the
    # current postmaster.
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)
        [[ -n "$pid" ]] || pid=$IDEM__PG_PID
    fi
    # Only trust the PID while it still names a postgres process (PIDs get reused).
    if [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]]; then pid=""; fi
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        idem__log "stopping PostgreSQL ($dir)"
        (cd "$dir" && idem__as postgres "$IDEM__PG_BIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop) \
            >/dev/null 2>&1 || true
    fi
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        # pg_ctl stop failed or timed out: immediate shutdown, then the hard way.
        kill -QUIT "$pid" 2>/dev/null || true
        sleep 2
        if kill -0 "$pid" 2>/dev/null; then
            idem__log "killing postmaster $pid"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    if [[ "$dir" == */idem-pg-* && -d "$dir" ]]; then
        rm -rf "$dir"
    fi
    IDEM__PG_DIR="" IDEM__PG_BIN="" IDEM__PG_PID=""
    unset IDEM_PGCTL
}

# ---------------------------------------------------------------------------------------------
# idem_stop_servers — stop everything this shell started; safe to call any number of times.
# ---------------------------------------------------------------------------------------------
idem_stop_servers() {
    # Never let cleanup abort half-way (errexit) or change the caller's exit status.
    local rc=$?
    idem_stop_postgres || true
    idem_stop_rabbitmq_cluster || true
    idem_stop_rabbitmq || true
    return $rc
}

# Register idem_stop_servers to run when the script exits, including on Ctrl-C / kill (bash runs
# the EXIT trap on `exit`, so turn the signals into exits with the conventional codes).
idem_stop_servers_on_exit() {
    trap 'idem_stop_servers' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}
