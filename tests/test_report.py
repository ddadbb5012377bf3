"""cedm.report: the self-contained HTML page and its Markdown twin, opened in headless Chromium."""
import html
import re
import shutil
import subprocess

import numpy as np
import pytest

from cedm import report
from cedm.evaluate import save_image_grid
from cedm.io import CedmError, RunDir, save_array, save_json, write_manifest


def make_run(root):
    """A run directory with the artifacts every stage leaves (small, made by hand)."""
    rd = RunDir(root)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 16, 16, 3), dtype=np.uint8)
    save_array(rd.data / "images.npy", images)
    save_array(rd.data / "labels.npy", rng.integers(0, 3, 60))
    write_manifest(rd.data, "data", {"dataset": "digits", "resolution": 16, "num_classes": 3})
    for c, r in ((2, 1.0), (4, 1.0), (8, 0.75)):
        d = rd.cluster("temi", c)
        save_array(d / "assignments.npy", rng.integers(0, c, 60))
        save_json(d / "summary.json", {"method": "temi", "clusters": c, "used_clusters": int(r * c), "r_c": r,
                                       "anmi": 0.5, "acc": 0.6, "q": [1 / c] * c})
        write_manifest(d, "cluster", {"c": c})
    save_json(rd.bound / "table.json", {"alpha": 0.96, "c_max": 4, "temi_runs": 3,
                                        "rows": [{"clusters": 2, "r_c": 1.0}, {"clusters": 8, "r_c": 0.75}]})
    write_manifest(rd.bound, "bound", {})
    for cond, fd in (("uncond", 9.0), ("temi-C2", 7.0), ("temi-C4", 6.5)):
        s = rd.sample(cond)
        save_image_grid(images[:16], s / "grid.png")
        c = 1 if cond == "uncond" else int(cond[6:])
        np.savez(s / "images.npz", images=images[:24], clusters=np.arange(24) % c, labels=np.arange(24) % c)
        write_manifest(s, "sample", {"cond": cond})
        e = rd.eval(cond)
        save_json(e / "metrics.json", {"cond": cond, "metric": "fd_pixels", "label": "FD (pixels)",
                                       "mean": fd, "std": 0.1, "sets": 2, "values": [fd, fd]})
        if cond != "uncond":
            save_image_grid(images[:8], e / "confident.png")
            save_image_grid(images[8:16], e / "unconfident.png")
        write_manifest(e, "evaluate", {"cond": cond})
    return rd


def test_report_has_every_section_and_a_markdown_twin(tmp_path):
    rd = make_run(tmp_path / "run")
    path = report.build(rd.root)
    page = path.read_text()
    n_img = len(re.findall(r"<img ", page))
    # utilisation plot + FD plot + C_V's clusters beside its samples, then the other two models'
    # grids (uncond, temi-C2) + 2x2 confidence grids
    assert n_img == 2 + 1 + 2 + 4
    assert page.count("src='data:image/png;base64,") == n_img          # self-contained
    assert "C_max = <b>4</b>" in page and "temi-C4" in page
    # what a reader needs first: the verdict, then the curves, then C_V's grid
    assert page.index("<b>Verdict</b>") < page.index("<img ") < page.index("C_V: training images of each cluster")
    assert "C_V = 4 beats the unconditional model by +25.0 σ" in page
    assert "<details><summary>1 clusterings without a trained model" in page         # temi-C8 folded
    md = (path.parent / "report.md").read_text()
    for name in re.findall(r"\]\((fig\d+\.png)\)", md):
        assert (path.parent / name).stat().st_size > 100
    assert len(re.findall(r"\]\((fig\d+\.png)\)", md)) == n_img
    assert "| temi-C8 | 8 | 6 | 0.750 |" in md


def test_report_shows_temi_acc_ari_and_the_one_to_one_acc(tmp_path):
    """ACC is TEMI's; a summary written before it (one-to-one accuracy under "acc") is shown in
    the ACC 1:1 column, never as TEMI's ACC (docs/method.md#cluster-metrics)."""
    rd = make_run(tmp_path / "run")
    d = rd.cluster("temi", 4)
    save_json(d / "summary.json", {"method": "temi", "clusters": 4, "used_clusters": 4, "r_c": 1.0,
                                   "anmi": 0.5, "nmi": 0.55, "ari": 0.45, "acc": 0.9, "acc_hungarian": 0.6,
                                   "q": [0.25] * 4})
    head, rows, folded = report.cluster_rows(report.collect(rd.root))
    row = {r[0]: dict(zip(head, r)) for r in rows}
    assert [r[0] for r in folded] == ["temi-C8"]
    assert (row["temi-C4"]["ACC"], row["temi-C4"]["ARI"], row["temi-C4"]["ACC 1:1"]) == ("0.900", "0.450", "0.600")
    assert (row["temi-C2"]["ACC"], row["temi-C2"]["ACC 1:1"]) == ("–", "0.600")        # legacy summary


def test_report_on_an_empty_run_is_a_clear_error(tmp_path):
    with pytest.raises(CedmError, match="no finished stages"):
        report.build(tmp_path / "empty")
    assert not (tmp_path / "empty" / "report").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)")
def test_report_loads_every_image_in_headless_chromium(tmp_path):
    rd = make_run(tmp_path / "run")
    path = report.build(rd.root)
    n_img = len(re.findall(r"<img ", path.read_text()))
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         path.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', out.stdout)
    assert m, f"page did not finish loading: {out.stderr[-500:]}"
    assert int(m[2]) == n_img and int(m[1]) == n_img


def test_ablations_are_rows_of_their_own_and_never_a_candidate(tmp_path):
    """Tables 4 and 5 (folders <name>@<ablation>): an ablation table beside the method's value;
    not in the main table, the FD-vs-C plot or the choice of C_V (even when its FD is the best)."""
    rd = make_run(tmp_path / "run")
    d = rd.cluster("temi", 8, "gamma1")
    save_json(d / "summary.json", {"method": "temi", "clusters": 8, "used_clusters": 3, "r_c": 0.375,
                                   "ablation": "gamma1"})
    write_manifest(d, "cluster", {"c": 8, "ablation": "gamma1"})
    e = rd.eval("temi-C4", "uniform")
    save_json(e / "metrics.json", {"cond": "temi-C4", "metric": "fd_pixels", "label": "FD (pixels)",
                                   "mean": 1.0, "std": 0.2, "values": [1.0, 1.0]})
    write_manifest(e, "evaluate", {"cond": "temi-C4", "ablation": "uniform"})
    info = report.collect(rd.root)
    assert info["sweep"]["c_v"] == 4 and report.ablations(info)["temi-C4@uniform"]["base"] == "6.500 ± 0.100"
    md = (report.build(rd.root).parent / "report.md").read_text()
    assert "| temi-C8@gamma1 | temi-C8 | Table 5: TEMI with gamma = 1" in md
    assert "| C^u = 3, r_C = 0.375 | C^u = 6, r_C = 0.750 |" in md
    assert "| temi-C4@uniform | temi-C4 | Table 4: cluster labels drawn uniformly" in md
    assert "| 1.000 ± 0.200 | 6.500 ± 0.100 |" in md
    main_table = md.split("## Ablations")[0]
    assert "@" not in main_table.split("| conditioning |")[1]


def test_report_states_the_features_20nn_accuracy(tmp_path):
    """The paper's Table 3 beside the run's summary, from features/knn_accuracy.json."""
    rd = make_run(tmp_path / "run")
    save_json(rd.features / "knn_accuracy.json", {"k": 20, "temperature": 0.02, "metric": "cosine",
                                                  "rule": "TEMI gen_embeds.py", "num_train": 60, "num_test": 30,
                                                  "accuracy": 0.9123, "accuracy_top5": 0.99, "accuracy_majority": 0.9,
                                                  "dino": {"temperature": 0.07, "accuracy": 0.95}})
    write_manifest(rd.features, "features", {"backbone": "pixels"})
    md = (report.build(rd.root).parent / "report.md").read_text()
    assert "features pixels: 20-NN accuracy **0.9123** (top-5 0.9900) (TEMI gen_embeds.py: cosine, votes " \
           "exp(cos/0.02); DINO's T = 0.07: 0.9500; majority vote 0.9000) on 30 held-out images" in md


def test_report_states_the_clip_pseudo_labels(tmp_path):
    """labels:clip (Table 2) is a row of the table like labels, and its zero-shot accuracy a line."""
    rd = make_run(tmp_path / "run")
    clip = rd.root / "clip"
    save_json(clip / "summary.json", {"model": "ViT-bigG-14", "class_names": ["a", "b", "c"], "num_images": 60,
                                      "accuracy": 0.875})
    write_manifest(clip, "clip-labels", {"model": "ViT-bigG-14"})
    e = rd.eval("labels:clip")
    save_json(e / "metrics.json", {"cond": "labels:clip", "metric": "fd_pixels", "label": "FD (pixels)",
                                   "mean": 5.5, "std": 0.1, "values": [5.5, 5.5]})
    write_manifest(e, "evaluate", {"cond": "labels:clip"})
    md = (report.build(rd.root).parent / "report.md").read_text()
    assert "CLIP pseudo-labels (labels:clip, Table 2): ViT-bigG-14, 3 class names, 60 images, " \
           "zero-shot accuracy **0.8750**" in md
    assert "| labels-clip |" in md and "5.500 ± 0.100" in md


def test_a_guided_sample_set_is_shown_beside_its_model_and_never_scored_as_it(tmp_path):
    """`cedm sample --guidance` writes sample/<cond>@<setting> (cedm.sample.sampler_variant): the
    report shows it as that model's variant, with the model's training groups beside it, and the
    verdict and tables stay the plain sets'."""
    rd = make_run(tmp_path / "run")
    plain = report.collect(rd.root)
    v = rd.root / "sample" / "temi-C2@cfg0.3"
    shutil.copytree(rd.sample("temi-C2"), v)
    info = report.collect(rd.root)
    assert "temi-C2@cfg0.3" in info["samples"] and info["eval"] == plain["eval"]
    grid = report.paired_grid(rd.root, "temi-C2@cfg0.3", info)
    assert grid == report.paired_grid(rd.root, "temi-C2", info)      # exemplars | samples, not the bare grid
    assert grid != (v / "grid.png").read_bytes()
    page = html.unescape(report.build(rd.root).read_text())
    assert ("temi-C2@cfg0.3: training images of each group (left) and images generated for it (right), largest "
            "first (the sampler setting cfg0.3, beside temi-C2's plain samples)") in page
    assert "C_V = 4 beats the unconditional model by +25.0 σ" in page
