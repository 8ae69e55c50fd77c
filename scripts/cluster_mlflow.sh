#!/usr/bin/env bash
# The MLflow tracking server of a cluster, run on its head node (cluster.yaml starts it after Ray).
#
#   cluster_mlflow.sh start ARTIFACTS_URI [BIND_HOST]   (re)start; prints the tracking URI
#   cluster_mlflow.sh stop                              stop the server and its loopback relay
#   cluster_mlflow.sh uri                               print the tracking URI of the running server
#   cluster_mlflow.sh backup DEST_URI                   copy the run database to DEST_URI (s3://, gs://, a path)
#   cluster_mlflow.sh restore SRC_URI                   put a backed-up database in place (server stopped)
#
# Where it listens: BIND_HOST, by default this node's cluster-internal (private) address, the one Ray
# registers for it, because Train rank 0 logs from the GPU worker nodes and must reach the server.
# Never 0.0.0.0 (or ::), which would also listen on a public interface: the server has no
# authentication, and anyone who reaches it can read and delete runs. On AWS the security group the
# launcher creates admits the cluster's own nodes on every port and the outside world on port 22 only.
# People reach the UI through SSH: a relay on 127.0.0.1:PORT (socat, when installed) forwards to the
# private address, so `ray attach cluster.yaml -p PORT` works; `ssh -L PORT:<private ip>:PORT` always does.
#
# Runs: a sqlite database under MLFLOW_HOME (default ~/mlflow) on this node's disk, one worker
# process (sqlite takes one writer). Artifacts: proxied by the server to ARTIFACTS_URI (the bucket).
# Env: PYTHON (default ~/pcl-ray-venv/bin/python, else python3), MLFLOW_HOME, MLFLOW_PORT (5000).
set -euo pipefail

PYTHON=${PYTHON:-$HOME/pcl-ray-venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
HOME_DIR=${MLFLOW_HOME:-$HOME/mlflow}
PORT=${MLFLOW_PORT:-5000}
DB="$HOME_DIR/mlflow.db"

die() { echo "cluster_mlflow.sh: $*" >&2; exit 2; }

stop_group() {  # stop_group PIDFILE: end the process group that the pid file's leader started
  local f=$1
  if [ -f "$f" ]; then
    local pid
    pid=$(cat "$f")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  fi
}

node_ip() {  # the address Ray uses for this node: its private address on a cloud VM
  "$PYTHON" -c 'from ray.util import get_node_ip_address; print(get_node_ip_address())'
}

wait_healthy() {  # wait_healthy URL: up to 90 s for GET URL/health
  "$PYTHON" - "$1" <<'EOF'
import sys, time, urllib.request
url = sys.argv[1] + "/health"
deadline = time.monotonic() + 90
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"cluster_mlflow.sh: no answer from {url} after 90 s")
    time.sleep(1)
EOF
}

copy_uri() {  # copy_uri SRC DEST: one file, either side a local path or a pyarrow filesystem URI
  "$PYTHON" - "$1" "$2" <<'EOF'
import os, sys
from pyarrow import fs

def resolve(uri):
    return fs.FileSystem.from_uri(uri if "://" in uri else "file://" + os.path.abspath(uri))

(src_fs, src), (dst_fs, dst) = resolve(sys.argv[1]), resolve(sys.argv[2])
if isinstance(dst_fs, fs.LocalFileSystem):
    dst_fs.create_dir(os.path.dirname(dst), recursive=True)
fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
EOF
}

cmd=${1:-}
case "$cmd" in
  start)
    artifacts=${2:-}
    [ -n "$artifacts" ] || die "start: give the artifact store, e.g. s3://<bucket>/mlflow"
    host=${3:-$(node_ip)}
    case "$host" in
      ""|0.0.0.0|::|"[::]"|"*") die "start: refusing to bind to '$host' (all interfaces): give this node's private address" ;;
    esac
    mkdir -p "$HOME_DIR"
    stop_group "$HOME_DIR/relay.pid"
    stop_group "$HOME_DIR/server.pid"
    # setsid: its own session and process group (stop ends the whole group, the uvicorn worker
    # included), and nothing ties it to the SSH session that started it.
    MLFLOW_BIND_HOST=$host MLFLOW_BIND_PORT=$PORT MLFLOW_DB=$DB MLFLOW_ARTIFACTS=$artifacts \
      PIDFILE="$HOME_DIR/server.pid" MLFLOW_BIN="$(dirname "$PYTHON")/mlflow" \
      setsid nohup bash -c 'echo $$ > "$PIDFILE"; exec "$MLFLOW_BIN" server --host "$MLFLOW_BIND_HOST" \
        --port "$MLFLOW_BIND_PORT" --workers 1 --backend-store-uri "sqlite:///$MLFLOW_DB" \
        --artifacts-destination "$MLFLOW_ARTIFACTS"' > "$HOME_DIR/server.log" 2>&1 < /dev/null &
    uri="http://$host:$PORT"
    wait_healthy "$uri" || { tail -n 20 "$HOME_DIR/server.log" >&2; exit 1; }
    echo "$uri" > "$HOME_DIR/tracking_uri"
    if [ "$host" != 127.0.0.1 ] && command -v socat >/dev/null; then
      RELAY="TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,fork" TARGET="TCP:$host:$PORT" PIDFILE="$HOME_DIR/relay.pid" \
        setsid nohup bash -c 'echo $$ > "$PIDFILE"; exec socat "$RELAY" "$TARGET"' \
        > "$HOME_DIR/relay.log" 2>&1 < /dev/null &
      relay="; UI relay on 127.0.0.1:$PORT"
    else
      relay=""
    fi
    echo "MLflow tracking server: $uri (runs: $DB; artifacts: $artifacts; log: $HOME_DIR/server.log$relay)"
    ;;
  stop)
    stop_group "$HOME_DIR/relay.pid"
    stop_group "$HOME_DIR/server.pid"
    rm -f "$HOME_DIR/tracking_uri"
    ;;
  uri)
    [ -f "$HOME_DIR/tracking_uri" ] || die "uri: no server started (no $HOME_DIR/tracking_uri)"
    cat "$HOME_DIR/tracking_uri"
    ;;
  backup)
    dest=${2:-}
    [ -n "$dest" ] || die "backup: give a destination, e.g. s3://<bucket>/mlflow/mlflow.db"
    [ -f "$DB" ] || die "backup: no database at $DB"
    snap="$HOME_DIR/mlflow-backup.db"
    # sqlite's online backup: a consistent copy while the server keeps running
    "$PYTHON" -c 'import sqlite3, sys; s = sqlite3.connect(sys.argv[1]); d = sqlite3.connect(sys.argv[2]); s.backup(d); d.close(); s.close()' "$DB" "$snap"
    copy_uri "$snap" "$dest"
    echo "backed up $DB to $dest"
    ;;
  restore)
    src=${2:-}
    [ -n "$src" ] || die "restore: give the backup, e.g. s3://<bucket>/mlflow/mlflow.db"
    [ ! -f "$HOME_DIR/server.pid" ] || die "restore: stop the server first (cluster_mlflow.sh stop)"
    mkdir -p "$HOME_DIR"
    copy_uri "$src" "$DB"
    echo "restored $DB from $src"
    ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || exit 2
    ;;
esac
