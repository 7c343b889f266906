"""An export's manifest records what the exported models saw, and staleness is computed from that (issue 35, item 7)."""

import pytest

from dataward.errors import DatawardError
from dataward.sampling.export import export_states, export_ward
from dataward.ward import Ward, WardHooks


def _slice_one_id(ward, compartment):
    lineage = next(l for l in ward.lineages() if l.kind == "denoiser" and l.compartment == compartment)
    return sorted(set(lineage.stage_ids[1]) - set(lineage.stage_ids[0]))[0]


def test_an_export_during_a_fallback_records_the_stage_it_holds_and_is_stale_after_retraining(base_ward, tmp_path):
    base_ward.accept_forget([_slice_one_id(base_ward, 0)])  # compartment 0 falls back to stage 0
    stage0 = base_ward.served()[0]
    assert stage0.stage == 0
    manifest = export_ward(base_ward.read(), tmp_path / "acme", allowed=[0], label=1)
    [entry] = manifest["compartments"]
    assert (entry["stage"], entry["fallback"], entry["ids_sha256"]) == (0, True, stage0.ids_hash)
    assert entry["samples"] == stage0.metadata["num_ids"] < base_ward.ledger.counts()[0]["samples"]
    base_ward.train()
    [state] = export_states(base_ward.ledger)
    assert state["stale"] and state["changed_compartments"] == [0]


def test_a_forget_committing_during_an_export_leaves_no_export_recorded_as_current(base_ward, tmp_path):
    served = base_ward.served()[0]
    base_ward.model(served)  # loaded already, as in a server
    other = Ward.open(base_ward.path)
    victim = base_ward.training_data(0).ids[0]
    base_ward.hooks = WardHooks(on_load=lambda record: other.ledger.forgotten_ids() or other.accept_forget([victim]))
    with pytest.raises(DatawardError, match="stopped being served while exporting"):
        export_ward(base_ward.read(), tmp_path / "acme", allowed=[0], label=1)
    assert not (tmp_path / "acme").exists() and export_states(base_ward.ledger) == []
    other.close()


def test_an_export_inside_the_ward_folder_is_refused(base_ward):
    with pytest.raises(DatawardError, match="inside the ward folder"):
        export_ward(base_ward.read(), base_ward.path / "models" / "x", allowed=[0], label=1)
    assert not (base_ward.path / "models" / "x").exists()
