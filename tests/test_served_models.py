"""The read side (issue 30): a request reads which model serves each compartment once, and every part of it (the
composed denoiser, the router, attribution) uses those records; a request begun before a forget keeps its records."""

from dataward.training.planner import Planner


def test_a_sample_reads_the_served_models_once_per_kind(ward_copy, monkeypatch):
    """Ward.denoiser used to read the served models again for every compartment of a mixture (K + 1 reads for K = 3)."""
    reads = []
    served = Planner.served

    def counted(self, kind="denoiser"):
        reads.append(kind)
        return served(self, kind)

    monkeypatch.setattr(Planner, "served", counted)
    result = ward_copy.sample(2, steps=2, weights="router")
    assert result.compartments == [0, 1, 2] and result.weights == "router"
    assert sorted(reads) == ["denoiser", "router"]


def test_a_request_keeps_the_records_it_read_while_a_forget_lands(ward_copy):
    models = ward_copy.read()
    before = dict(models.served())
    ward_copy.accept_forget([ward_copy.training_data(1).ids[0]])
    assert models.served() == before  # the request that read them sees the same records (its results are re-checked)
    now = ward_copy.read().served()  # a new request sees the forget: compartment 1 falls back or is left out
    assert now.get(1) is None or now[1].id != before[1].id
    assert now[0].id == before[0].id
