"""`rapid3 bench` on a tiny exported model: every registered method runs (or is reported as unable
to), metrics against full compute are consistent, and the report, JSON and plots are written."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from tiny_pipelines import export_tiny_embedded

from rapid3.accel.actions import next_time_on_grid
from rapid3.backbones import TimeSchedule
from rapid3.cli import main
from rapid3.embedded import scenes
from rapid3.embedded.model import embedded_transformer_config
from rapid3.eval import bench, report
from rapid3.policy import RapidPolicy

STEPS = 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return export_tiny_embedded(tmp_path_factory.mktemp("embedded"), num_layers=2)


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    # Learned policies join as registered methods (`rapid3 bench --policy A,B --tpdm C`), RAPID3's swept over the
    # lambda each was trained with.
    config = embedded_transformer_config()
    folders = []
    for lam in (0.9, 0.97, None):
        folder = tmp_path_factory.mktemp("policy")
        RapidPolicy(latent_channels=config["in_channels"], patch_size=config["patch_size"],
                    pooled_dim=config["pooled_projection_dim"], hidden_dim=16).save_pretrained(folder)
        if lam is not None:
            (folder / "rapid3_policy.json").write_text(json.dumps({"train_config": {"lam": lam}}))
        folders.append(str(folder))
    learned = bench.policy_methods(",".join(folders[:2]), folders[2])
    assert list(learned) == ["rapid3", "tpdm"]
    assert learned["rapid3"].values == (0.9, 0.97) and learned["rapid3"].knob == "lam"
    assert learned["tpdm"].values == (folders[2],) and learned["tpdm"].knob == "policy"
    out = tmp_path_factory.mktemp("bench")
    knobs = {"uniform": (2,), "fora": (2,), "teacache": (0.3,), "first_block": (0.5,), "static_sparse": (3,),
             "mag_cache": (0.2,), "taylorseer_cache": (2,), "pyramid_attention_broadcast": (2,),
             "first_block_cache": (0.1,)}
    config = bench.BenchConfig.create(quick=True, out=out, model=tiny_model, steps=STEPS, prompts=2, singles=1,
                                      repeats=1, calibration_images=3, knobs=knobs)
    reward = lambda images, prompts: [float(len(p)) for p in prompts]
    methods = {**bench.default_methods(), **learned}  # passed to this run only: nothing to undo after it
    yield bench.run_bench(config, methods, reward=reward, progress=False), out


def test_every_method_runs_or_says_why_not(results):
    res, _ = results
    status = {row["key"]: row["status"] for row in res["entries"]}
    assert status.pop("first_block_cache=0.1") == "failed"
    assert set(status.values()) == {"ok"} and {"rapid3=0.9", "rapid3=0.97", f"tpdm={res['entries'][-1]['value']}"} <= status.keys()
    assert list(status)[:2] == ["full", "peer_full"]  # references first
    failed = next(r for r in res["entries"] if r["status"] == "failed")
    assert "NoneType" in failed["error"] and "context_pre_only" in failed["explanation"]


def test_metrics_are_consistent_with_their_definitions(results):
    res, _ = results
    rows = {row["key"]: row["metrics"] for row in res["entries"] if row["status"] == "ok"}
    full = rows["full"]
    assert full["psnr"] == 100.0 and full["ssim"] == pytest.approx(1.0)
    assert full["fd_full"] == pytest.approx(0, abs=1e-6)
    assert full["speedup_flops"] == 1.0 and full["speedup_latency"] == 1.0 and full["equivalent_steps"] == STEPS
    assert rows["peer_full"]["gflops"] == pytest.approx(full["gflops"])  # same model, same counter
    assert rows["uniform=2"]["equivalent_steps"] == 2 and rows["uniform=2"]["speedup_flops"] == pytest.approx(2)
    assert rows["uniform=2"]["psnr"] < 100
    assert rows["fora=2"]["steps"] == STEPS and rows["fora=2"]["equivalent_steps"] < STEPS
    policy = next(m for key, m in rows.items() if key.startswith("rapid3="))
    first_span = next(iter(policy["action_maps"].values()))[0]
    # The fresh policy's Step-Skip: Beta mode 0.85, so 1 / 0.85 intervals of the STEPS-step grid.
    grid_step = next_time_on_grid(torch.ones(1), torch.tensor([0.85]), TimeSchedule(t_min=1e-3).uniform_times(STEPS))
    assert first_span[:2] == pytest.approx([1.0, grid_step.item()])
    assert all(m["reward"] == pytest.approx(sum(len(p["caption"]) for p in res["prompts"]) / 3) for m in rows.values())
    assert all(m["discriminator"] is None and m["latency_s"] > 0 for m in rows.values())
    assert Counter(p["complexity"] for p in res["prompts"]) == Counter({1: 1, 3: 1, 2: 1})
    assert set(res["calibration"]) == {"teacache", "mag_cache"}


def test_report_json_and_plots_are_written(results):
    res, out = results
    on_disk = json.loads((out / "results.json").read_text())
    assert len(on_disk["entries"]) == len(res["entries"])
    report = (out / "report.md").read_text()
    results_section = report.split("## Results")[1].split("\n## ")[0]
    table = [line for line in results_section.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(table) == len(res["entries"])
    assert "## RAPID3 against every other method at matched speedup" in report
    assert "could not run on this backbone" in report and "apply_first_block_cache" in report
    for name in ("pareto.png", "action_maps.png", "adaptivity.png"):
        assert (out / name).stat().st_size > 10_000
    assert json.loads((out / "calibration.json").read_text()) == res["calibration"]


def test_prompts_are_held_out_and_stratified():
    specs = scenes.evaluation_prompts(200, 25)
    kinds = Counter(s.kind for s in specs)
    assert kinds == {"count": 6, "pair": 42, "relation": 76, "triple": 76, "single": 25}
    assert len({s.caption for s in specs[:200]}) == 200
    with pytest.raises(ValueError, match="held-out split has"):
        scenes.evaluation_prompts(10_000, 0)


def test_cli_lists_methods_and_rejects_unknown_ones(capsys, tmp_path):
    assert main(["bench", "--list-methods"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("teacache", "mag_cache", "first_block_cache", "static_sparse"))
    assert main(["bench", "--methods", "nope", "--out", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err


def _entry(method: str, speedup: float, accuracy: float, psnr: float) -> dict:
    return {"method": method, "label": method, "status": "ok", "value": speedup, "knob": "k",
            "metrics": {"speedup_latency": speedup, "accuracy": accuracy, "psnr": psnr}}


def test_matched_speedup_comparison_interpolates_each_sweep_at_rapid3s_speedup():
    results = {"entries": [_entry("full", 1.0, 0.9, 100.0), _entry("rapid3", 3.0, 0.8, 30.0),
                           _entry("uniform", 2.0, 0.9, 35.0), _entry("uniform", 4.0, 0.5, 25.0),
                           _entry("fora", 1.5, 0.85, 40.0), _entry("teacache", 3.1, 0.82, 20.0)]}
    rows = {c["method"]: c for c in report.matched_speedup_comparison(results)}
    assert set(rows) == {"uniform", "fora", "teacache"}
    assert rows["uniform"]["accuracy"] == (0.8, pytest.approx(0.7)) and rows["uniform"]["psnr"][1] == pytest.approx(30.0)
    assert rows["fora"]["accuracy"] == (0.8, None)  # its sweep stops at 1.5x
    assert rows["teacache"]["accuracy"] == (0.8, 0.82)  # one setting within 5% of 3.0x
    text = report._claim(results)
    assert any("checker acc. below teacache by 0.020 at 3.00×" in line for line in text)
    assert any(line.startswith("Not compared") and "fora (1.50–1.50×)" in line for line in text)
    assert not any(line.startswith("| ") and "fora" in line for line in text)
    assert not any("Faster and at least as good" in line for line in text)


def test_claim_names_entries_that_are_faster_and_better_than_rapid3():
    """A one-setting method outside every matched speedup is still caught when it dominates RAPID3."""
    results = {"entries": [_entry("rapid3", 3.0, 0.8, 30.0), _entry("rapid3", 2.0, 0.9, 34.0),
                           _entry("tpdm", 4.5, 0.8, 31.0), _entry("uniform", 2.5, 0.95, 33.0)]}
    pairs = [(ours["metrics"]["speedup_latency"], other["method"]) for ours, other in
             report.dominating_entries(results)]
    assert pairs == [(3.0, "tpdm")]  # uniform is faster than the 2x entry but lower on PSNR
    assert any(line.startswith("**Faster and at least as good on every metric**: tpdm") and "(4.50×)" in line
               and "(3.00×)" in line for line in report._claim(results))


def test_sweeps_from_the_command_line_are_typed_and_checked():
    methods = bench.default_methods()
    assert bench.parse_sweeps(["fora=2,4", "teacache=0.1,0.4"], methods) == {"fora": (2, 4), "teacache": (0.1, 0.4)}
    with pytest.raises(ValueError, match="registered method"):
        bench.parse_sweeps(["nope=1"], methods)
    with pytest.raises(ValueError, match="interval takes int values"):
        bench.parse_sweeps(["fora=two"], methods)


def test_learned_methods_join_one_run_only(results):
    """The policies of a run were passed to it: the built-in methods of the next run are unchanged."""
    assert not {"rapid3", "tpdm"} & bench.default_methods().keys()


def test_the_bench_can_caption_its_scenes_in_unseen_words(tiny_model, tmp_path):
    """`--wording unseen`: the same scenes and seeds, captions no training caption has, said in the report."""
    from rapid3.embedded.scenes import all_scenes

    out = tmp_path / "unseen"
    args = ["bench", "--quick", "--model", str(tiny_model), "--methods", "uniform", "--sweep", "uniform=2",
            "--prompts", "2", "--singles", "1", "--steps", "4", "--out", str(out), "--wording", "unseen"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    grammar = {spec.caption for spec in all_scenes()}
    assert res["config"]["wording"] == "unseen" and not {p["caption"] for p in res["prompts"]} & grammar
    assert "`--wording unseen`" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="wording must be one of grammar, unseen"):
        bench.BenchConfig(wording="paraphrase")
