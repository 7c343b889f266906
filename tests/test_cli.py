"""The command line end to end on a tiny run, and its error handling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

CLI = [sys.executable, "-c", "from dataward.app.cli import main; main()"]


def run(*args, check=True, columns=200):
    """Run the CLI at a given terminal width (rich wraps human-readable output to it)."""
    env = dict(os.environ, COLUMNS=str(columns))
    proc = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=900, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    ward = tmp_path / "w"
    run("init", ward, "--data", "digits:subset=40", "-k", "2", "--slices", "2", "--steps", "3", "--batch-size", "16", "--no-router")
    run("train", ward)
    grid, npz = tmp_path / "g.png", tmp_path / "s.npz"
    out = run("sample", ward, "-n", "6", "--steps", "5", "--grid", grid, "--npz", npz, "--json")
    summary = json.loads(out.stdout)
    assert summary["compartments"] == [0, 1] and len(summary["attribution"]) == 6
    assert grid.stat().st_size > 100
    with np.load(npz, allow_pickle=False) as data:
        assert data["images"].shape == (6, 1, 8, 8) and data["images"].dtype == np.float32
        assert 0.0 <= data["images"].min() and data["images"].max() <= 1.0
        assert data["labels"].shape == (6,) and np.allclose(data["attribution"].sum(1), 1.0, atol=1e-5)
    status = json.loads(run("status", ward, "--json").stdout)
    assert [c["samples"] for c in status["compartments"]] and sum(c["samples"] for c in status["compartments"]) == 40
    ids_file = tmp_path / "ids.txt"
    from dataward.ward import Ward

    first = Ward.open(ward).training_data(0).ids[0]
    ids_file.write_text(first + "\n")
    forgot = json.loads(run("forget", ward, "--ids-file", ids_file, "--json").stdout)
    assert forgot["ids"] == [first] and forgot["state"] == "done"
    again = run("forget", ward, first)
    assert "already forgotten" in again.stdout
    cert = json.loads(run("verify", ward, "--json").stdout)
    assert cert["ok"] and cert["forgotten"] == 1


def test_cli_errors_are_one_line(tmp_path):
    proc = run("status", tmp_path / "missing", check=False, columns=40)  # errors never wrap, even when narrow
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2
    proc = run("init", tmp_path / "w", "--data", "npz:/does/not/exist.npz", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cli_latent_ward(tmp_path):
    ward = tmp_path / "w"
    run("init", ward, "--data", "digits:subset=40", "-k", "2", "--steps", "3", "--batch-size", "16", "--no-router")
    refused = run("pretrain", ward, "--autoencoder-steps", "3", check=False)
    assert refused.returncode == 1 and "need --latent" in refused.stderr
    out = run("pretrain", ward, "--public", "printed:count=40", "--steps", "2", "--latent", "--autoencoder-steps", "3",
              "--autoencoder-data", "strokes:count=40")
    assert "latent space: 4x4x4 latents; autoencoder trained on strokes:count=40" in out.stdout
    run("train", ward)
    status = json.loads(run("status", ward, "--json").stdout)
    assert status["latent"]["latent_shape"] == [4, 4, 4] and status["latent"]["autoencoder"]["public"] is True
    assert "latent space: 4x4x4 latents of autoencoder" in run("status", ward).stdout
    npz = tmp_path / "s.npz"
    run("sample", ward, "-n", "3", "--steps", "4", "--npz", npz)
    with np.load(npz, allow_pickle=False) as data:
        assert data["images"].shape == (3, 1, 8, 8)  # decoded from the latents
    refused = run("train", ward, "--dp", "--epsilon", "10", "--noise-multiplicity", "0", check=False)
    assert refused.returncode == 1 and "noise_multiplicity must be a positive integer" in refused.stderr
    out = run("train", ward, "--dp", "--epsilon", "10", "--dp-batch-size", "10", "--dp-epochs", "1", "--dp-compartments", "1", "--noise-multiplicity", "2")
    assert "compartment 0: not DP" in out.stdout
    privacy = json.loads(run("status", ward, "--json").stdout)["privacy"]["compartments"]["1"]
    assert privacy["epsilon"] <= 10.0 and privacy["noise_multiplicity"] == 2 and privacy["trainable"] == "attention"
    assert "2 noise draws per example" in " ".join(run("status", ward).stdout.split())  # (rich wraps long lines)
    refused = run("train", ward, "--dp", "--trainable", "attn", check=False)
    assert refused.returncode == 1 and "trainable must be one of attention, embedding, full" in refused.stderr
    run("train", ward, "--dp", "--epsilon", "5", "--dp-batch-size", "10", "--dp-epochs", "1", "--dp-compartments", "0", "--trainable", "embedding", "--replace-dp")
    privacy = json.loads(run("status", ward, "--json").stdout)["privacy"]["compartments"]["0"]
    assert privacy["trainable"] == "embedding" and 0 < privacy["trainable_fraction"] < 0.01 and privacy["lr"] == 0.1


def test_a_forget_is_accepted_while_an_earlier_retraining_is_pending_and_broken(tmp_path):
    """Issue 19, defect 1: `forget` accepts the new IDs first, whatever is pending or broken; the retraining comes after."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import make_ward

    ward = make_ward(tmp_path / "w", compartments=2)
    ward.train()
    rows = ward.ledger.sample_rows(list(ward.training_data().ids))
    late = [i for i, (c, s, _) in rows.items() if s == 1]  # in slice 1: retraining resumes from stage 0's saved state
    first, second = late[0], next(i for i in late if rows[i][0] != rows[late[0]][0])
    ward.accept_forget([first])  # accepted, retraining pending (as after a crash or a Ctrl-C)
    for state in (tmp_path / "w" / "models").glob("*/train_state.safetensors"):
        state.write_bytes(b"not a safetensors file")  # the pending retraining cannot resume from them
    ward.close()
    proc = run("forget", tmp_path / "w", second, check=False)
    # issue 35: a damaged training state is refused by its hash and that stage retrains from the start, with a warning
    assert proc.returncode == 0 and "not resuming from stage 0" in " ".join(proc.stderr.split())
    assert f"1 ID(s) forgotten; in effect now" in proc.stdout  # the new forget was accepted first
    from dataward.ward import Ward

    reopened = Ward.open(tmp_path / "w")
    assert {first, second} <= set(reopened.ledger.forgotten_ids())
    served = [r for kind in ("denoiser", "router") for r in reopened.served(kind).values()]
    assert all(second not in reopened.ledger.model_sample_ids(r.id) for r in served)  # nothing that saw it is served
    sampled = run("sample", tmp_path / "w", "-n", "2", "--steps", "3", "--json")  # sampling is not blocked by the broken retraining
    assert len(json.loads(sampled.stdout)["attribution"]) == 2


@pytest.mark.slow
def test_markup_in_user_data_is_printed_as_text(tmp_path):
    """Issue 19, defect 8: an owner or key name like ``[/]`` is data, not rich markup: status and keys list print it."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.random((12, 1, 8, 8), dtype=np.float32), labels=np.arange(12) % 10,
             ids=np.array([f"s{i}" for i in range(12)]), owners=np.array(["[/]", "[bold]x"] * 6))
    ward = tmp_path / "w"
    run("init", ward, "--data", f"npz:{tmp_path / 'd.npz'}", "--by", "source")
    status = run("status", ward).stdout
    assert "[/]" in status and "[bold]x" in status
    run("keys", ward, "create", "--allow", "0", "--name", "[/]")
    listed = run("keys", ward, "list").stdout
    assert "[/]" in listed
    assert "([/])" in run("keys", ward, "revoke", "[/]").stdout


def _main(monkeypatch, capsys, *args):
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from dataward.app import cli

    monkeypatch.setattr(sys, "argv", ["dataward", *map(str, args)])
    monkeypatch.setitem(cli.STATE, "debug", False)
    code = 0  # main() returns when the command succeeded
    try:
        cli.main()
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_answers_without_loading_torch():
    """`dataward --help` and `dataward CMD --help` used to import torch and diffusers first (about 6-11 s)."""
    probe = ("import sys; from dataward.app.cli import main; sys.argv = ['dataward', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'opacus', 'peft') if m in sys.modules))")
    for args in (["--help"], ["sample", "--help"], ["--version"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "[]", (args, proc.stdout[-300:])
    import dataward

    assert dataward.Ward.__module__ == "dataward.ward" and "Ward" in dataward.__all__  # the API is still there, on first use
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dataward.Nope


def test_usage_errors_follow_click_conventions(monkeypatch, capsys, tmp_path):
    """Issue 22: usage line, a "Try --help" hint and exit 2 for usage errors; --version; --debug anywhere; help that
    shows brackets and does not print a metavar on flags."""
    import dataward

    code, out, _ = _main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"dataward {dataward.__version__}"
    for args, message in ((["init"], "Missing argument 'WARD'"), (["status", "--bogus"], "No such option: --bogus"), (["nosuch"], "No such command")):
        code, out, err = _main(monkeypatch, capsys, *args)
        text = out + err
        assert code == 2 and "Usage: dataward" in text and "--help' for help" in text and message in text, text
    from dataward.errors import DatawardError

    with pytest.raises(DatawardError, match="is not a ward"):  # --debug after the command: accepted, so the error is raised
        _main(monkeypatch, capsys, "status", tmp_path / "missing", "--debug")
    code, out, _ = _main(monkeypatch, capsys, "train", "--help")
    assert code == 0 and "pip install 'dataward[ray]'" in " ".join(out.split()) and "<bool>" not in out


def test_epsilon_and_delta_are_written_one_way():
    from dataward.app.terminal import epsilon_delta

    assert epsilon_delta(0.9967909301145604, 1e-4) == "ε = 0.997, δ = 1.00e-04"
    assert epsilon_delta(float("inf"), 1.0) == "ε = inf, δ = 1.00e+00" and epsilon_delta("inf", 1e-5) == "ε = inf, δ = 1.00e-05"


def test_a_second_dp_setting_does_not_silently_replace_the_first(monkeypatch, capsys, tmp_path):
    """Issue 22: `train --dp` with another setting used to retrain (or un-DP) compartments the user did not name."""
    from conftest import make_ward

    from dataward.config import DPConfig
    from dataward.ward import Ward

    ward = make_ward(tmp_path / "w", compartments=2, router=False)
    ward.reconfigure(dp=DPConfig(epsilon=10.0), dp_compartments=(1,))
    ward.close()
    code, _, err = _main(monkeypatch, capsys, "train", tmp_path / "w", "--dp", "--epsilon", "1", "--dp-compartments", "0")
    assert code == 1 and "already DP-trains compartment(s) [1] at ε = 10" in " ".join(err.split()) and "--replace-dp" in err
    ward = Ward.open(tmp_path / "w", worker=True)
    assert ward.config.dp.epsilon == 10.0 and ward.config.dp_compartments == (1,)  # nothing changed
    ward.close()


def test_sampling_that_would_keep_nothing_is_refused_before_it_runs(monkeypatch, capsys, tmp_path):
    code, _, err = _main(monkeypatch, capsys, "sample", tmp_path / "anything", "--guard")
    assert code == 1 and "nothing would be kept" in err and "--grid" in err


def test_progress_in_a_log_file_is_written_as_it_goes():
    """Issue 22: with stderr redirected to a file, rich's bar only appears at the end; lines appear at every tenth."""
    import io

    from rich.console import Console

    from dataward.progress import LineProgress

    log = io.StringIO()
    progress = LineProgress(Console(file=log, force_terminal=False, width=200))
    task = progress.add_task("train compartment 0", total=20)
    lines_after = []
    for _ in range(20):
        progress.update(task, advance=1)
        lines_after.append(len(log.getvalue().splitlines()))
    lines = log.getvalue().splitlines()
    assert lines[0] == "train compartment 0: started (0/20)"
    assert lines_after[1] == 2 and lines_after[3] == 3  # written while the work runs, not at its end
    assert len(lines) == 11 and lines[-1].startswith("train compartment 0: 20/20 (100%), ")


def test_the_router_has_its_own_budget(monkeypatch, capsys, tmp_path):
    """Issue 22: `train --steps` did not bound the router and there was no router budget option."""
    from conftest import make_ward

    from dataward.ward import Ward

    ward = make_ward(tmp_path / "w", compartments=2)
    ward.train()
    old = ward.served("router")[None].id
    ward.close()
    code, out, _ = _main(monkeypatch, capsys, "train", tmp_path / "w", "--router-steps", "3")
    assert code == 0 and "the router's budget is now 3 steps (was 2 steps)" in " ".join(out.split())
    ward = Ward.open(tmp_path / "w", worker=True)
    router = ward.served("router")[None]
    assert router.id != old and router.metadata["train"]["steps"] == 3 and ward.config.router_train.steps == 3
    ward.close()


def test_forget_says_that_the_router_retrains(monkeypatch, capsys, tmp_path):
    from conftest import make_ward

    ward = make_ward(tmp_path / "w", compartments=2)
    ward.train()
    victim = ward.training_data(0).ids[0]
    ward.close()
    code, out, _ = _main(monkeypatch, capsys, "forget", tmp_path / "w", victim)
    assert code == 0 and "the router saw every compartment and retrains too (it saw the forgotten IDs; 2 steps" in " ".join(out.split())


def _options_by_command():
    """{command path: {parameter name: click parameter}} for every command and sub-command of the CLI."""
    import typer.main

    from dataward.app.cli import app

    found, todo = {}, [("dataward", typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        found[path] = {p.name: p for p in command.params}
        todo += [(f"{path} {name}", sub) for name, sub in getattr(command, "commands", {}).items()]
    return found


def _type_name(param) -> str:
    """A parameter's type: newer typer keeps its annotation (its own click has no ``type``); older typer, click's type."""
    descriptor = getattr(param, "type_descriptor", None)
    return descriptor.annotation.__name__ if descriptor is not None else param.type.name


def test_one_option_name_per_concept_across_commands():
    """Issue 22: `init --batch-size` vs `train --batch`, `--epochs` a float budget in init but DP's int in train, `audit --n`
    vs `sample -n`, `--out` a PNG, a JSON file or a folder. Now an option means one thing (one parameter, one type) in every
    command, a parameter is spelled one way everywhere, and `--out` is always a folder."""
    meaning, spelling = {}, {}
    for command, params in _options_by_command().items():
        for name, param in params.items():
            spelling.setdefault(name, {})[tuple(param.opts)] = command
            for opt in param.opts:
                meaning.setdefault(opt, {})[(name, _type_name(param))] = command
    assert {opt: m for opt, m in meaning.items() if len(m) > 1} == {}
    assert {name: s for name, s in spelling.items() if len(s) > 1} == {}
    assert [name for name, _ in meaning["--out"]] == ["out_dir"]
    options = {command: {opt for p in params.values() for opt in p.opts} for command, params in _options_by_command().items()}
    assert {"--batch-size", "--epochs"} <= options["dataward init"]
    assert {"--dp-batch-size", "--dp-epochs", "--dp-lr", "--dp-compartments"} <= options["dataward train"]
    assert not {"--batch", "--epochs", "--lr", "--compartment"} & options["dataward train"]
    assert {"-n", "--n", "--grid", "--npz"} <= options["dataward sample"] and not {"--out", "--save"} & options["dataward sample"]
    assert {"-n", "--n", "--json-out"} <= options["dataward audit"] and "--out" not in options["dataward audit"]


def test_status_is_readable_at_80_columns(monkeypatch, capsys, base_ward_dir):
    """Issue 22: at 80 columns the status table wrapped every cell into slivers; now each compartment gets a block of
    whole lines there, and the table stays where it fits."""
    from rich.console import Console

    from dataward.app.commands import inspection
    from dataward.ward import Ward

    ward = Ward.open(base_ward_dir, worker=True)
    compartments = ward.status().compartments
    ward.close()
    for columns in (80, 200):
        monkeypatch.setenv("COLUMNS", str(columns))
        monkeypatch.setattr(inspection, "out", Console())  # what the CLI's console reads from the environment when it starts
        code, out, _ = _main(monkeypatch, capsys, "status", base_ward_dir)
        lines = out.splitlines()
        assert code == 0 and max(map(len, lines)) <= columns and f"ward {base_ward_dir}" in lines
        for c in compartments:
            whole = f"compartment {c['id']}: {c['samples']} samples ({c['forgotten']} forgotten), serving {c['serving']}"
            row = f"│ {c['id']} "
            assert (whole in lines) == (columns == 80) and any(line.startswith(row) for line in lines) == (columns == 200)
            assert columns == 200 or f"    source: {c['source']}" in lines


def test_status_shows_how_often_each_guard_would_steer_on_members_and_on_public_images():
    """Issue 17: status says how often a guard is sure enough to steer, on its members and on public images it never saw."""
    from dataward.app.commands.inspection import _guard_lines

    def by_t(*values: float) -> dict[str, float]:
        return {str(t): v for t, v in zip((0, 100, 200, 300, 400, 500), values)}

    guard = {"accuracy_by_t": by_t(1.0, 0.98, 0.9, 0.7, 0.45, 0.12), "alpha": 0.1, "confident_members_by_t": by_t(1.0, 0.98, 0.89, 0.7, 0.45, 0.125),
             "confident_public_by_t": by_t(0.0, 0.005, 0.0, 0.0, 0.0, 0.0), "public_probe": "printed:count=1200 (last 200)"}
    lines = _guard_lines(guard)
    assert lines == ["by t = 0/100/200/300/400/500:",
                     "bits right                 1.00 0.98 0.90 0.70 0.45 0.12",
                     "sure on members (p > 0.9)  1.00 0.98 0.89 0.70 0.45 0.12",
                     "sure on public images      0.00 0.01 0.00 0.00 0.00 0.00"]
    assert all(len(line) + 6 <= 80 for line in lines)  # whole lines under their compartment at 80 columns
    old = {"accuracy_by_t": by_t(0.5, 0.5, 0.5, 0.5, 0.5, 0.5)}  # a guard trained before issue 17 recorded its accuracy only
    assert _guard_lines(old) == ["by t = 0/100/200/300/400/500:", "bits right  0.50 0.50 0.50 0.50 0.50 0.50"]


def test_the_demo_summary_prints_whole_paths():
    """Issue 22: the demo's summary table cut its paths with an ellipsis at 80 columns."""
    import io

    from rich.console import Console

    from dataward.app.demo import print_summary

    where = "/tmp/" + "a-long-folder-name/" * 6 + "composed.png"
    text = io.StringIO()
    print_summary(Console(file=text, width=80), "dataward demo: done in 107.3 s",
                  [("sample", "64 samples composed with density weights", where, "12.5"), ("forget", "5 IDs; certificate OK", "dataward verify", "30.0")])
    lines = text.getvalue().splitlines()
    assert f"    {where}" in lines and "…" not in text.getvalue()
    assert "sample (12.5 s): 64 samples composed with density weights" in lines and "forget (30.0 s): 5 IDs; certificate OK" in lines


def test_guard_command_trains_the_papers_guard_on_request_and_refuses_a_bad_weight(ward_copy):
    from typer.testing import CliRunner

    from dataward.app.cli import app
    from dataward.errors import DatawardError
    from dataward.ward import Ward

    path = ward_copy.path
    ward_copy.close()
    refused = CliRunner().invoke(app, ["guard", str(path), "--steps", "2", "--nonmember-weight", "-1"])
    assert isinstance(refused.exception, DatawardError) and "nonmember_weight must be a finite number >= 0" in str(refused.exception)
    assert Ward.open(path).config.guard is False  # refused before anything changed
    result = CliRunner().invoke(app, ["guard", str(path), "--steps", "2", "--nonmember-weight", "0"])
    assert result.exit_code == 0, result.output
    ward = Ward.open(path)
    assert ward.config.guard and ward.config.guard_settings.nonmember_weight == 0 and ward.config.guard_settings.steps == 2
    guards = ward.ledger.models("guard", any_compartment=True)
    assert sorted({g.compartment for g in guards}) == ward.compartments()
    assert not any(lineage.variant.startswith("calibrated-") for lineage in ward.lineages() if lineage.kind == "guard")  # the paper's recipe
    ward.close()


def test_status_names_a_model_whose_folder_size_is_unknown():
    """The status table's model cell said nothing of a served model whose folder is gone (``bytes`` None): a second
    ``_megabytes`` (without the None case) replaced the first, and the cell raised TypeError."""
    from dataward.app.commands.inspection import _model_summary

    assert _model_summary({"id": 7, "stage": 1, "steps": 12, "bytes": None}) == "#7 stage 1, 12 steps, ?"
    assert _model_summary({"id": 7, "stage": 1, "steps": 12, "bytes": 2_500_000}) == "#7 stage 1, 12 steps, 2.5 MB"
    assert _model_summary(None) == "-"
