# Sourced by scripts/python-env and scripts/cuda-cargo.
# make_venv DIR: a fresh Python virtual environment in DIR (python3-venv installed first where
# Debian's python3 lacks it and this is root).
make_venv() {
    local venv=$1
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$venv"
            python3 -m venv "$venv"
        else
            echo "python3 cannot make a virtual environment: install python3-venv" >&2
            return 1
        fi
    fi
}
