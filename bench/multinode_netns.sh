#!/usr/bin/env bash
# Multi-node sharded training on one machine: two "hosts" as network namespaces joined by a veth pair
# (10.77.0.1 <-> 10.77.0.2), each running `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
# --rdzv-endpoint 10.77.0.1:29400` of a 4-step `sharding: full` LoRA run of the tests' tiny Llama (batch 2 per
# rank; loaded from a folder by rank 0, whose shards the other node's rank receives), gloo told to use the veth
# (GLOO_SOCKET_IFNAME). Checks that the per-step losses equal a 1-process run of the same global batch (4 rows), that
# the traffic went over the veth pair, and that rank 1 never read the model. Needs root and iproute2 (`ip`): without
# them it says so in one line and exits 0.
#
# Run: bench/multinode_netns.sh   (PYTHON=/path/to/python to pick the interpreter; about a minute)
set -euo pipefail
if [[ $(id -u) != 0 ]]; then echo "multinode_netns.sh: skipped: needs root (ip netns add)"; exit 0; fi
if ! command -v ip >/dev/null; then echo "multinode_netns.sh: skipped: iproute2's ip is not installed"; exit 0; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
TMP=$(mktemp -d)
A=pk-a-$$ B=pk-b-$$ VA=pkva$$ VB=pkvb$$
cleanup() { ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; [[ -n ${KEEP:-} ]] || rm -rf "$TMP"; }
trap cleanup EXIT
trap "exit 130" INT TERM  # the EXIT trap then removes the namespaces
export PYTHONPATH="$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

ip netns add "$A"; ip netns add "$B"
ip link add "$VA" type veth peer name "$VB"
ip link set "$VA" netns "$A"; ip link set "$VB" netns "$B"
ip -n "$A" addr add 10.77.0.1/24 dev "$VA"; ip -n "$B" addr add 10.77.0.2/24 dev "$VB"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "$VA" up; ip -n "$B" link set "$VB" up

"$PY" - "$TMP" <<'PY'
import json, sys
from pathlib import Path
from test_train import write_data
tmp = Path(sys.argv[1])
data = write_data(tmp / "d.jsonl", n=40)
base = dict(data=data, precision="fp32", lr=1e-2, method="lora", method_config={"r": 4}, max_length=64,
            progress=False, packing=False, warmup_ratio=0.0, max_steps=4, seed=3)
plan = lambda name, **kw: [{"name": name, "config": {**base, "output_dir": str(tmp / name), **kw}}]
from conftest import tiny_llama, tiny_tokenizer
tiny_llama().save_pretrained(tmp / "tiny")  # the multi-node run loads it: rank 0 reads it, rank 1 receives shards
tiny_tokenizer().save_pretrained(tmp / "tiny")
multi = plan("multi", batch_size=2, sharding="full", model=str(tmp / "tiny"))
multi[0]["from_folder"] = True
(tmp / "multi.json").write_text(json.dumps(multi))
(tmp / "one.json").write_text(json.dumps(plan("one", batch_size=4)))
PY

bytes_of() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/tx_bytes"; }
node() {  # namespace, its veth, its address, whether it hosts the rendezvous store: one "host" of the job
  # is_host and --local-addr: torchrun would find the store's host and the workers' master by the hostname, which a
  # namespace shares with the machine (its address is not on the veth)
  ip netns exec "$1" env GLOO_SOCKET_IFNAME="$2" "$PY" -m torch.distributed.run --nnodes 2 --nproc-per-node 1 \
    --rdzv-backend c10d --rdzv-endpoint 10.77.0.1:29400 --rdzv-id "pk$$" --rdzv-conf "is_host=$4" \
    --local-addr "$3" --max-restarts 0 \
    "$ROOT/tests/sharding_worker.py" "$TMP/multi.json" >"$TMP/$1.log" 2>&1
}
before=$(bytes_of "$B" "$VB")
node "$A" "$VA" 10.77.0.1 1 & pa=$!
node "$B" "$VB" 10.77.0.2 0 & pb=$!
status=0; wait $pa || status=$?; wait $pb || status=$?
if [[ $status != 0 ]]; then grep -h -m3 -iE "error|exception|hostname|resolve" "$TMP/$A.log" "$TMP/$B.log"; tail -n 5 "$TMP/$A.log" "$TMP/$B.log"; echo "multinode_netns.sh: FAILED (exit $status)"; exit 1; fi
sent=$(( $(bytes_of "$B" "$VB") - before ))
"$PY" "$ROOT/tests/sharding_worker.py" "$TMP/one.json" >"$TMP/one.log" 2>&1 || { tail -n 30 "$TMP/one.log"; exit 1; }

"$PY" - "$TMP" "$sent" <<'PY'
import json, math, sys
from pathlib import Path
tmp, sent = Path(sys.argv[1]), int(sys.argv[2])
ranks = [json.loads((tmp / "multi" / f"rank{r}.json").read_text()) for r in (0, 1)]
one = json.loads((tmp / "one" / "rank0.json").read_text())["losses"]
multi = ranks[0]["losses"]
print(f"2 nodes x 1 process (sharding: full, world {ranks[0]['world']}): losses {multi}")
print(f"1 process, same global batch:                  losses {one}")
print(f"node B sent {sent / 2**20:.2f} MiB over its veth")
same = len(multi) == len(one) == 4 and all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(multi, one))
print(f"model weights read by rank 0: {ranks[0]['loads']}, by rank 1: {ranks[1]['loads']} (its shards received)")
if not (same and ranks[1]["losses"] == multi and ranks[0]["world"] == 2 and sent > 100_000
        and [r["loads"] for r in ranks] == [[True], [False]]):
    sys.exit("multinode_netns.sh: FAILED: the two-node run differs from one process, did not use the veth, or "
             "its second node read the model")
print("multinode_netns.sh: OK: equal within rel 1e-5")
PY
