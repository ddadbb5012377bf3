#!/usr/bin/env bash
# The official C-EDM clusterings through cedm: every cluster_ids.pt/freq.pt pair imported with
# `cedm cluster --import`, and the r_C table, plot and C_max of the DINO ViT-B/16 TEMI clusterings
# (gamma = 0.6) by `cedm bound --from-existing` (docs/results/official-bound.md).
#
#   bash docs/results/official-bound.sh OFFICIAL OUT
#
# OFFICIAL: a checkout of HHU-MMBS/cedm-official-wavc2025 (its cluster_ids/ folder); OUT: a new folder
# for the run directories. The datasets: $CIFAR10 / $CIFAR100 (the python-version tarballs; unset:
# the official download) and $FFHQ (EDM's ffhq-64x64.zip). STANDIN=1 prepares instead, per dataset,
# a folder of blank 8x8 PNGs of the training set's size (50,000 / 50,000 / 70,000): the import
# checks only the id count against the images, and r_C = C^u / C reads only the ids, so the
# tables are the same; ACC/NMI against labels need the real data.
set -euo pipefail
OFFICIAL=$(cd "$1" && pwd); OUT=$2
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
IDS=$OFFICIAL/cluster_ids

prepare() {   # prepare DATASET N RUN_DIR
  local ds=$1 n=$2 run=$3
  if [ "${STANDIN:-0}" = 1 ]; then
    python3 - "$OUT/standin-$n.zip" "$n" <<'PY'
import io, sys, zipfile
from PIL import Image
buf = io.BytesIO(); Image.new("RGB", (8, 8)).save(buf, format="PNG")
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for i in range(int(sys.argv[2])):
        z.writestr(f"{i // 1000:05d}/img{i:08d}.png", buf.getvalue())   # EDM dataset_tool.py's names
PY
    cedm data --run-dir "$run" --dataset folder --source "$OUT/standin-$n.zip"
  elif [ "$ds" = ffhq ]; then
    cedm data --run-dir "$run" --dataset folder --source "${FFHQ:?set FFHQ to EDM\'s ffhq-64x64.zip}"
  else
    local src=${ds^^}; src=${!src:-}
    cedm data --run-dir "$run" --dataset "$ds" ${src:+--source "$src"}
  fi
}

declare -A SIZE=([cifar10]=50000 [cifar100]=50000 [ffhq]=70000)
ok=0; refused=0
for ds in cifar10 cifar100 ffhq; do
  base=$OUT/$ds
  prepare "$ds" "${SIZE[$ds]}" "$base"
  # 1. every clustering of the dataset, each into a run directory of its own (same data)
  while IFS= read -r f; do
    d=$(dirname "$f"); rel=${d#"$IDS"/}
    case $rel in
      */CLIP_pseudo_labels*) method=clip; c=$(python3 -c "import torch; print(len(torch.load('$d/freq.pt')))");;
      */kmeans-*) method=kmeans; c=$(basename "$d"); c=${c#clusters-};;
      *) method=temi; c=$(basename "$(dirname "$d")"); c=${c#clusters_}; c=${c%%_*};;
    esac
    abl=(); case $rel in */beta-1) abl=(--ablation gamma1);; esac
    run=$OUT/all/${rel//\//+}
    mkdir -p "$run" && cp -r "$base/data" "$run/"
    if cedm cluster --run-dir "$run" --import "$d" --method "$method" --clusters "$c" "${abl[@]}" \
        2>"$run/import.log"; then ok=$((ok + 1)); echo "imported  $rel"
    else refused=$((refused + 1)); echo "REFUSED   $rel: $(tail -1 "$run/import.log")"; fi
  done < <(find "$IDS/$ds" -name cluster_ids.pt | sort)
  # 2. the bound from the DINO ViT-B/16 TEMI clusterings at gamma = 0.6 (clusters_<C>/beta-0.6)
  for d in "$IDS/$ds"/TEMI-dino_vitb16/clusters_*/beta-0.6; do
    c=$(basename "$(dirname "$d")"); c=${c#clusters_}
    case $c in *[!0-9]*) echo "bound: leaving out $d (a second clustering of C = ${c%%_*})"; continue;; esac
    cedm cluster --run-dir "$base" --import "$d" --method temi --clusters "$c" 2>>"$base/import.log" ||
      echo "bound: leaving out $d: $(tail -1 "$base/import.log")"
  done
  cedm bound --run-dir "$base" --from-existing
  python3 - "$base/bound/table.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print("| C | C^u | r_C | > alpha |\n|---:|---:|---:|:---:|")
for r in t["rows"]:
    print(f"| {r['clusters']} | {r['used_clusters']} | {r['r_c']:.4f} | {'yes' if r['r_c'] > t['alpha'] else 'no'} |")
print(f"\nC_max = {t['c_max']} ({t['note']})")
PY
done
echo "imported $ok clusterings, refused $refused"
