"""`gradwise repro` writes its results; figures themselves are measured by running it, not asserted."""

import json

import pytest

from gradwise.cli import main


def test_repro_memory_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "memory"
    assert main(["repro", "memory", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("results.md", "policies.png", "memory_vs_depth.png"):
        assert (out / name).stat().st_size > 100
    mlp = {r["policy"]: r for r in results["mlp_policies"]}
    assert mlp["sqrt"]["activation_bytes"] < mlp["none"]["activation_bytes"]
    depth = results["depth_curve"]
    assert depth[-1]["none_bytes"] / depth[0]["none_bytes"] > depth[-1]["sqrt_bytes"] / depth[0]["sqrt_bytes"]
    assert [r["precision"] for r in results["precisions"]] == ["fp32", "bf16", "fp16"]
    assert "Headline" in (out / "results.md").read_text()


def test_unknown_experiment_exits_2(capsys):
    assert main(["repro", "nosuch"]) == 2
    assert "unknown experiment 'nosuch'" in capsys.readouterr().err


def test_repro_large_batch_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "lb"
    assert main(["repro", "large-batch", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "accuracy_vs_batch.png").stat().st_size > 100
    batches = results["settings"]["batches"]
    assert {(r["optimizer"], r["batch_size"]) for r in results["best"]} == {
        (o, b) for o in ("sgd+momentum", "adam", "lars", "lamb") for b in batches}
    # the layer-wise optimizers report a trust ratio per adapted (2-D+) tensor, none for biases
    lamb = next(r for r in results["runs"] if r["optimizer"] == "lamb")
    assert lamb["trust_ratios"] and all(name.endswith("weight") for name in lamb["trust_ratios"])
    md = (out / "results.md").read_text()
    assert "| batch | sgd+momentum | adam | lars | lamb |" in md
    # every lr is chosen on the validation split: the reported best is the best by validation accuracy
    for best in results["best"]:
        rivals = [r for r in results["runs"]
                  if (r["optimizer"], r["batch_size"]) == (best["optimizer"], best["batch_size"])]
        assert best["val_accuracy"] == max(r["val_accuracy"] for r in rivals)
    # part two: LARS at both trust coefficients, each also with pytorch-optimizer's LARS, and LAMB, over seeds
    recipes = {(c["recipe"], c["batch_size"]): c for c in results["recipe"]}
    batch = results["settings"]["recipe_batches"][0]
    names = ("lars eta=1e-3", "lars eta=1e-2", "lars eta=1e-3 (pytorch-optimizer)", "lars eta=1e-2 (pytorch-optimizer)",
             "lamb")
    assert set(recipes) == {(name, batch) for name in names}
    assert all(len(c["test_accuracy"]) == len(results["settings"]["recipe_seeds"]) for c in recipes.values())
    peer = [r for r in results["recipe_runs"] if "pytorch-optimizer" in r["recipe"]]
    assert peer and not any(r["trust_ratios"] for r in peer)  # the peer's optimizer, not gradwise's, ran them
    ours = [r for r in results["recipe_runs"] if r["recipe"] == "lars eta=1e-2"]
    assert ours and all(r["lr"] * 1e-2 == pytest.approx(r["rate"]) for r in ours)  # lr = rate / eta
    assert "## Part two" in md and "## Verdict" in md


def test_large_batch_reuses_only_runs_finished_with_the_same_settings(tmp_path):
    from gradwise.experiments.large_batch import finished_runs, one_run, settings, settings_record

    s = settings(quick=True)
    done = {"optimizer": "adam", "batch_size": 256, "lr_multiplier": 1.0, "val_accuracy": 0.5, "seed": 0}
    previous = tmp_path / "results.json"
    previous.write_text(json.dumps({"settings": settings_record(s), "runs": [done], "recipe_runs": []}))
    cache = finished_runs(previous, s)
    assert one_run("adam", 256, 1.0, s, cache) == {**done, "reused": True}  # read back, not trained
    previous.write_text(json.dumps({"settings": {**settings_record(s), "epochs": 99}, "runs": [done]}))
    assert finished_runs(previous, s) == {}  # another budget: nothing is reused
    other_lr = settings_record(s)
    other_lr["optimizers"]["adam"]["base_lr"] = 0.5  # the same multiplier would now mean another lr
    previous.write_text(json.dumps({"settings": other_lr, "runs": [done]}))
    assert finished_runs(previous, s) == {}
    assert finished_runs(tmp_path / "absent.json", s) == {}


def test_target_loss_stops_at_the_first_step_whose_trailing_mean_reaches_the_target():
    from types import SimpleNamespace

    from gradwise.experiments.depth import TargetLoss

    trainer = SimpleNamespace(state=SimpleNamespace(should_stop=False))
    stopper = TargetLoss(target=2.0, window=3)
    for step, loss in enumerate([1.0, 9.0, 2.5, 2.0, 1.0, 1.0], start=1):  # trailing means 4.17, 4.5, 1.83
        stopper.on_step_end(trainer, SimpleNamespace(loss=loss))
        if trainer.state.should_stop:
            break
    assert (stopper.reached_at, step) == (5, 5)  # step 1's low loss alone (window not full) does not count


def test_repro_depth_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "depth"
    assert main(["repro", "depth", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "depth.png").stat().st_size > 100
    fc = {(r["depth"], r["variant"]): r for r in results["fc"]}
    assert fc[(16, "rezero")]["jacobian_at_init"] == pytest.approx(1.0)  # the identity at init
    assert fc[(16, "plain")]["jacobian_at_init"] < 1e-3  # a plain tanh stack contracts
    assert results["very_deep"]["blocks"] == 200 and results["very_deep"]["steps_done"] == 10
    conv = results["convergence"]
    s = results["settings"]
    assert {(c["variant"], c["warmup_steps"]) for c in conv["chosen"] if c["layers"] == 2} == {
        (v, w) for v in ("post-LN", "pre-LN", "rezero") for w in (0, s["warmups"]["2"])}
    for run in conv["runs"]:  # a run stops at the first step whose trailing mean reaches the target, or at the cap
        reached = run["steps_to_target"]
        assert run["steps_done"] == (reached if reached is not None else s["caps"][str(run["layers"])]) \
            or run["outcome"].startswith("diverged")
    assert set(conv["verdicts"]) == {"2 layers, warmup 0", "2 layers, warmup 5"}
    assert "## Character transformers: steps to a target loss" in (out / "results.md").read_text()


def test_repro_overfitting_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "overfitting"
    assert main(["repro", "overfitting", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("size.png", "penalties.png", "dropout.png"):
        assert (out / name).stat().st_size > 100
    rows = {r["variant"]: r for r in results["table"]}
    assert set(rows) == {"baseline", "smaller", "l2", "dropout", "early stopping"}
    assert rows["smaller"]["parameters"] < rows["baseline"]["parameters"]
    for r in results["runs"]:  # one validation point per epoch, and the gap is val minus train as reported
        assert r["curves"]["epoch"] == list(range(1, len(r["curves"]["epoch"]) + 1))
        assert r["gap"] == pytest.approx(r["final_val_loss"] - r["final_train_loss"])
    md = (out / "results.md").read_text()
    assert "| variant | parameters | best val loss |" in md and "## The seed's claims, checked" in md


def test_repro_async_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "async"
    assert main(["repro", "async", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "error_vs_workers.png").stat().st_size > 100
    methods = {(r["method"], r["workers"], r["ray"]) for r in results["table"]}
    assert methods == {("sequential SGD", 1, False), ("sequential SGD, momentum 0", 1, False), ("SSGD", 2, False),
                       ("ASGD", 2, False), ("DC-ASGD-a", 2, False), ("ASGD", 2, True)}
    chosen = {(c["method"], c["workers"]): c["lr"] for c in results["chosen_lr"]}
    for key, lr in chosen.items():  # each lr is the grid point with the best validation accuracy
        tried = [r for r in results["selection"] if (r["method"], r["workers"]) == key]
        assert len(tried) >= 2 and lr == max(tried, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
    runs = {(r["method"], r["ray"]): r for r in results["runs"] + results["ray_runs"] if r["workers"] == 2}
    assert runs[("SSGD", False)]["updates"] * 2 == runs[("ASGD", False)]["updates"]  # equal gradients
    assert runs[("ASGD", False)]["staleness_mean"] > 0 and runs[("ASGD", True)]["staleness_mean"] > 0
    assert [r["lambda"] for r in results["lambda_sweep"]] == [0.5, 2.0]
    md = (out / "results.md").read_text()
    assert "## Does delay compensation win back what asynchrony costs?" in md and "Wall time:" in md
    assert "## The simulator against real Ray workers" in md


def test_repro_async_keeps_a_diverged_grid_point_and_reuses_finished_runs(tmp_path):
    from gradwise.experiments import async_ps

    s = {**async_ps.settings(quick=True), "gradients": 6}
    diverged = async_ps.one_run("sequential SGD", 1, 0, 1e30, s, tmp_path)
    assert diverged["diverged"] and diverged["val_accuracy"] == 0.0 and diverged["test_error"] == 1.0
    trained = async_ps.one_run("ASGD", 2, 0, 0.05, s, tmp_path)
    marker = next((tmp_path / "runs").glob("ASGD-*")) / "metrics.jsonl"
    before = marker.stat().st_mtime_ns
    again = async_ps.one_run("ASGD", 2, 0, 0.05, s, tmp_path)  # read back, not retrained
    assert marker.stat().st_mtime_ns == before and again["test_error"] == trained["test_error"]
    assert async_ps.one_run("sequential SGD", 1, 0, 1e30, s, tmp_path)["diverged"] == diverged["diverged"]


def test_repro_precision_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "precision"
    assert main(["repro", "precision", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "precision.png").stat().st_size > 100
    variants = {(r["model"], r["variant"]) for r in results["runs"]}
    assert len(variants) == 10 and ("transformer", "fp16 master weights") in variants
    assert all(0 <= r["zero_grad_fraction"] <= 1 for r in results["runs"])
    assert set(results["inspect"]) == {"cnn", "transformer"}
