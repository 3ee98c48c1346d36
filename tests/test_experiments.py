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
    s = results["settings"]
    optimizers = ("sgd+momentum", "adam", "lars eta=1e-3", "lars eta=1e-2", "lamb")
    assert {(c["optimizer"], c["batch_size"]) for c in results["chosen"]} == {(o, b) for o in optimizers
                                                                              for b in s["batches"]}
    # every lr is chosen on the validation split at the selection seed: the chosen run is the best of its grid
    for c in results["chosen"]:
        rivals = [r for r in results["runs"] if (r["optimizer"], r["batch_size"], r["seed"])
                  == (c["optimizer"], c["batch_size"], s["select_seed"])]
        assert c["val_accuracy"] == max(r["val_accuracy"] for r in rivals)
    # the two largest batches train every seed at the chosen lr (seeds other than the selection seed); the rest one
    assert s["select_seed"] not in s["seeds"]
    seeded = {(r["optimizer"], r["batch_size"]): r["test_accuracy"] for r in results["seeded"]}
    assert set(seeded) == {(o, b) for o in optimizers for b in s["batches"][-2:]}
    assert all(len(v) == len(s["seeds"]) for v in seeded.values())
    # equal epochs: the update count falls with the batch
    updates = [results["updates"][str(b)] for b in s["batches"]]
    assert updates == sorted(updates, reverse=True) and updates[0] > updates[-1]
    # the layer-wise optimizers report a trust ratio per adapted (2-D+) tensor, none for biases
    lamb = next(r for r in results["runs"] if r["optimizer"] == "lamb")
    assert lamb["trust_ratios"] and all(name.endswith("weight") for name in lamb["trust_ratios"])
    assert set(results["verdicts"]) == {f"{o}@{b}" for o in ("lars", "lamb") for b in s["batches"][-2:]}
    md = (out / "results.md").read_text()
    assert "| batch | updates | " + " | ".join(optimizers) + " |" in md and "## Verdict" in md


def test_large_batch_reuses_only_runs_finished_with_the_same_settings(tmp_path, monkeypatch):
    from gradwise.experiments import large_batch

    s = {**large_batch.settings(quick=True), "num_samples": 640, "epochs": 1}
    first = large_batch.one_run("adam", 256, 1.0, 0, s, tmp_path)
    assert not first.get("reused")
    monkeypatch.setattr(large_batch, "train_one", lambda overrides: pytest.fail("a finished run was retrained"))
    assert large_batch.one_run("adam", 256, 1.0, 0, s, tmp_path) == {**first, "reused": True}
    monkeypatch.setattr(large_batch, "train_one", lambda overrides: {**first, "trained": True})
    assert large_batch.one_run("adam", 256, 1.0, 0, {**s, "epochs": 2}, tmp_path)["trained"]  # another budget
    changed = {**large_batch.RECIPES, "adam": (["optim.name=adam"], *large_batch.RECIPES["adam"][1:])}
    monkeypatch.setattr(large_batch, "RECIPES", changed)  # the same multiplier would now mean another run
    assert large_batch.one_run("adam", 256, 1.0, 0, s, tmp_path)["trained"]


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
    s = results["settings"]
    assert (out / "error_vs_workers.png").stat().st_size > 100
    # the staleness the simulator draws from is what a Ray run of M workers measured
    assert [p["workers"] for p in results["probes"]] == s["workers"]
    assert all(sum(p["histogram"].values()) == s["probe_gradients"] for p in results["probes"])
    # each arm's own lr is the best of its (extended) grid on validation at the selection seed
    for own in results["own_lr"]:
        tried = [r for r in results["selection"] if (r["method"], r["workers"]) == (own["method"], own["workers"])
                 and r["lambda"] in (None, 2.0)]
        assert len(tried) >= 2 and own["lr"] == max(tried, key=lambda r: (r["val_accuracy"], -r["lr"]))["lr"]
        assert all(r["seed"] == s["select_seed"] for r in tried)
    assert results["shared_lr"] in s["lr_grid"]
    shared = results["runs"]["one lr for every arm"]
    assert {r["lr"] for r in shared} == {results["shared_lr"]}
    assert {(r["method"], r["staleness"]) for r in shared} == {
        ("sequential SGD", "none"), ("ASGD", "ray"), ("ASGD", "round-robin"), ("DC-ASGD-a", "ray"),
        ("DC-ASGD-a", "round-robin")}
    # paired seeds: every arm trains every seed; the chosen lambda0 is used by every DC-ASGD-a run
    assert {r["seed"] for r in shared} == set(s["seeds"])
    assert {r["lambda"] for r in shared if r["method"] == "DC-ASGD-a"} == {results["lambda0"]}
    round_robin = [r for r in shared if r["staleness"] == "round-robin"]
    assert all(r["staleness_mean"] == pytest.approx(r["workers"] - 1, abs=0.5) for r in round_robin)
    assert results["pilot"]["gradients"] == 2 * s["gradients"] and len(results["pilot"]["runs"]) == len(s["seeds"])
    assert {(r["method"], r["workers"]) for r in results["ray_runs"]} == {
        (m, w) for m in ("ASGD", "DC-ASGD-a") for w in s["ray_check"]}
    assert all(r["ray"] and r["staleness_mean"] >= 0 for r in results["ray_runs"])
    assert len(results["claims"]) == 3 * len(s["workers"])
    md = (out / "results.md").read_text()
    for heading in ("## Budget (pilot)", "## Protocol 1: one lr for every method and M", "## Protocol 2",
                    "## Does delay compensation win back what asynchrony costs?",
                    "## The simulator against real Ray workers"):
        assert heading in md


def test_repro_async_keeps_a_diverged_grid_point_and_reuses_finished_runs(tmp_path):
    from gradwise.experiments import async_ps

    s = {**async_ps.settings(quick=True), "gradients": 6}
    diverged = async_ps.one_run("sequential SGD", 1, 0, 1e30, s, tmp_path)
    assert diverged["diverged"] and diverged["val_accuracy"] == 0.0 and diverged["test_error"] == 1.0
    trained = async_ps.one_run("ASGD", 2, 0, 0.05, s, tmp_path, staleness="round-robin")
    marker = next(tmp_path.glob("runs-*/ASGD-*")) / "metrics.jsonl"
    before = marker.stat().st_mtime_ns
    again = async_ps.one_run("ASGD", 2, 0, 0.05, s, tmp_path, staleness="round-robin")  # read back, not retrained
    assert marker.stat().st_mtime_ns == before and again["test_error"] == trained["test_error"]
    assert async_ps.one_run("sequential SGD", 1, 0, 1e30, s, tmp_path)["diverged"] == diverged["diverged"]


def test_async_verdict_reads_paired_differences():
    from gradwise.experiments.async_ps import verdict

    def arm(errors):  # an error of 1 is a diverged run
        return [{"seed": i, "test_error": e, "diverged": "non-finite" if e == 1 else None}
                for i, e in enumerate(errors)]

    seq = arm([0.05, 0.06, 0.07])
    assert verdict(seq, arm([0.05, 0.06, 0.07]), arm([0.05, 0.06, 0.07]))[0].startswith("nothing to win back")
    assert verdict(seq, arm([0.10, 0.11, 0.12]), arm([0.05, 0.06, 0.07]))[0] == "held"
    assert verdict(seq, arm([0.15, 0.16, 0.17]), arm([0.10, 0.11, 0.12]))[0].startswith("held partly")
    assert verdict(seq, arm([0.10, 0.11, 0.12]), arm([0.10, 0.115, 0.12]))[0] == "not held"
    assert verdict(seq, arm([0.10, 0.11, 0.12]), arm([0.05, 0.115, 0.12]))[0].startswith("not shown")
    # divergence is weighed by count, which an interval over 3 seeds cannot do
    word, text = verdict(seq, arm([1.0, 0.06, 1.0]), arm([0.05, 0.06, 0.07]))
    assert word == "held" and text.endswith("diverged: 2 of 3 ASGD")
    assert verdict(seq, arm([1.0, 0.06, 1.0]), arm([1.0, 0.06, 0.07]))[0].startswith("held partly")


def test_repro_precision_quick_writes_results(tmp_path, capsys):
    out = tmp_path / "precision"
    assert main(["repro", "precision", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "precision.png").stat().st_size > 100
    variants = {(r["model"], r["variant"]) for r in results["runs"]}
    assert len(variants) == 10 and ("transformer", "fp16 master weights") in variants
    assert all(0 <= r["zero_grad_fraction"] <= 1 for r in results["runs"])
    assert set(results["inspect"]) == {"cnn", "transformer"}
