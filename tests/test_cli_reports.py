"""Issue 36, what a new user saw in the command line: sample IDs to find, one rule for router weights, one stage
numbering, output folders that are never made behind the user's back, and keys whose help says what is required."""

import json

import pytest

from test_cli import _main


def test_samples_lists_live_ids_with_compartment_and_slice_and_never_a_forgotten_one(monkeypatch, capsys, ward_copy):
    path = ward_copy.path
    listed = json.loads(_main(monkeypatch, capsys, "samples", path, "--json")[1])
    live = sorted(ward_copy.training_data().ids)
    assert [row["id"] for row in listed] == live
    rows = ward_copy.ledger.sample_rows(live[:3])
    assert all((row["compartment"], row["slice"]) == rows[row["id"]][:2] for row in listed[:3])
    one = json.loads(_main(monkeypatch, capsys, "samples", path, "--compartment", "1", "--json")[1])
    assert one and {row["compartment"] for row in one} == {1}
    victim = listed[0]["id"]
    found = json.loads(_main(monkeypatch, capsys, "samples", path, "--search", victim.upper(), "--json")[1])
    assert [row["id"] for row in found] == [victim]
    ward_copy.accept_forget([victim])
    assert victim not in [row["id"] for row in json.loads(_main(monkeypatch, capsys, "samples", path, "--json")[1])]
    code, out, _ = _main(monkeypatch, capsys, "samples", path, "--search", victim)
    assert code == 0 and "0 live sample ID(s) containing" in out
    code, _, err = _main(monkeypatch, capsys, "samples", path, "--compartment", "9")
    assert code == 1 and "unknown compartment 9" in err


def test_router_weights_over_some_compartments_are_refused_as_the_service_refuses_them(monkeypatch, capsys, ward_copy, tmp_path):
    code, _, err = _main(monkeypatch, capsys, "sample", ward_copy.path, "--allow", "0,1", "--weights", "router", "--json")
    assert code == 1 and "router weights need every compartment" in err
    from dataward.errors import DatawardError
    from dataward.sampling.pipeline import WardPipeline

    with pytest.raises(DatawardError, match="router weights need every compartment"):
        ward_copy.sample(2, steps=2, allowed=[0], weights="router")
    with pytest.raises(DatawardError, match="router weights need every compartment"):
        WardPipeline(ward_copy, allowed=[0, 2], weights="router")
    assert ward_copy.sample(2, steps=2, weights="router").weights == "router"  # every compartment: allowed


def test_the_sample_table_numbers_stages_as_json_does(monkeypatch, capsys, ward_copy, tmp_path):
    code, out, _ = _main(monkeypatch, capsys, "sample", ward_copy.path, "-n", "2", "--steps", "2", "--json")
    stages = {int(c): m["stage"] for c, m in json.loads(out)["models"].items()}
    assert code == 0 and set(stages.values()) == {1}  # two slices: stages 0 and 1, the last one served
    code, out, _ = _main(monkeypatch, capsys, "sample", ward_copy.path, "-n", "2", "--steps", "2", "--grid", tmp_path / "g.png")
    assert code == 0 and "stage 1" in out and "stage 2" not in out


def test_a_grid_in_a_missing_folder_is_refused_before_sampling(monkeypatch, capsys, ward_copy, tmp_path):
    code, _, err = _main(monkeypatch, capsys, "sample", ward_copy.path, "--grid", tmp_path / "no" / "such" / "g.png")
    assert code == 1 and "the folder" in err and "does not exist" in err and not (tmp_path / "no").exists()


def test_keys_create_help_says_allow_is_required_and_what_all_means(monkeypatch, capsys):
    code, out, _ = _main(monkeypatch, capsys, "keys", "W", "create", "--help")
    text = " ".join(out.split())
    assert code == 0 and "Required (optional with --admin)" in text and "every compartment, those added later included" in text


def test_a_key_for_all_compartments_reaches_one_added_later(monkeypatch, capsys, tmp_path):
    """Issue 36: `keys create --allow all` was stored as the compartments of that day; one added later was not reachable."""
    from conftest import make_ward

    ward = make_ward(tmp_path / "w")  # 2 compartments, untrained
    code, out, err = _main(monkeypatch, capsys, "keys", tmp_path / "w", "create", "--allow", "all", "--name", "everyone")
    assert code == 0 and "every compartment (those added later too)" in " ".join(err.split() + out.split())
    raw = out.strip().splitlines()[-1]
    assert ward.ledger.key_for_hash(ward.ledger.hash_key(raw))["allow"] == [0, 1]
    ward.add("printed:count=20", train=False)
    assert ward.ledger.key_for_hash(ward.ledger.hash_key(raw))["allow"] == [0, 1, 2]
    assert [k["allow"] for k in ward.ledger.list_keys()] == ["all"]
    code, out, _ = _main(monkeypatch, capsys, "keys", tmp_path / "w", "list")
    assert code == 0 and "everyone" in out and " all " in out
