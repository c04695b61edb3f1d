"""Checkpoints written by fairseq_kd 0.1.0 (before the encoders/ layout) still load, through every
path that reads them, and give the outputs the old code computed (tests/data/v0.1.0/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

OLD = Path(__file__).resolve().parent / "data" / "v0.1.0"
ATOL = 1e-6


@pytest.fixture(scope="module")
def reference():
    return torch.load(OLD / "reference_outputs.pt", weights_only=True)


def fairseq_model(name: str):
    """The model as fairseq's own loader rebuilds it (decoding, validation, fine-tuning restores)."""
    from fairseq import checkpoint_utils

    import fairseq_kd  # noqa: F401  (registers thin_hubert, kws_sv, ...)

    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(OLD / f"{name}.pt")])
    return models[0].eval()


def assert_close(got, expected, what):
    if expected is None:
        assert got is None, what
    elif isinstance(expected, torch.Tensor):
        assert got.shape == expected.shape, what
        if expected.dtype == torch.bool:
            assert torch.equal(got, expected), what
        else:
            assert (got - expected).abs().max().item() <= ATOL, what
    elif isinstance(expected, dict):
        assert sorted(got) == sorted(expected), what
        for key in expected:
            assert_close(got[key], expected[key], f"{what}[{key}]")
    else:
        assert len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{what}[{i}]")


@pytest.mark.parametrize("name", ["thin_deep", "distilhubert"])
def test_distillation_checkpoints_give_the_old_outputs(reference, name):
    model = fairseq_model(name)
    with torch.no_grad():
        out = model(source=reference["source"], padding_mask=reference["padding_mask"])
    for key, expected in reference["outputs"][name].items():
        assert_close(out[key], expected, f"{name}.{key}")


def test_ctc_and_kws_sv_checkpoints_give_the_old_outputs(reference):
    source, padding_mask = reference["source"], reference["padding_mask"]
    with torch.no_grad():
        ctc = fairseq_model("ctc")(source=source, padding_mask=padding_mask)
        kws_sv = fairseq_model("kws_sv")(source=source, padding_mask=padding_mask)
    for key, expected in reference["outputs"]["ctc"].items():
        assert_close(ctc[key], expected, f"ctc.{key}")
    for key, expected in reference["outputs"]["kws_sv"].items():
        assert_close(kws_sv[key], expected, f"kws_sv.{key}")


@pytest.mark.parametrize("name", ["thin_deep", "ctc"])
def test_export_and_encoder_paths_read_old_checkpoints(reference, name):
    """fairseq-kd-export's reader (distillation and CTC files) and the encoder opener of
    model.w2v_path give the student's hidden states the old code gave."""
    from fairseq_kd.encoders.pretrained import open_encoder
    from fairseq_kd.export import load_student

    source, padding_mask = reference["source"], reference["padding_mask"]
    loaded = load_student(OLD / f"{name}.pt")
    encoder, found = open_encoder(OLD / f"{name}.pt", name, "a student", ValueError)
    assert found.kind == "thin_hubert" and loaded.model_cfg["time_reduction_factor"] == 2
    with torch.no_grad():
        exported = loaded.model.encode(source, padding_mask=padding_mask)["hidden_states"]
        opened = encoder.eval().encode(source, padding_mask=padding_mask)["hidden_states"]
    if name == "thin_deep":  # the distillation checkpoint's own encoder
        expected = reference["outputs"]["thin_deep"]["hidden_states"]
    else:  # the fine-tuned encoder inside the CTC model, as fairseq's hubert_ctc rebuilds it
        with torch.no_grad():
            inner = fairseq_model("ctc").w2v_encoder.w2v_model
            expected = inner.encode(source, padding_mask=padding_mask)["hidden_states"]
    assert_close(exported, expected, "export")
    assert_close(opened, expected, "open_encoder")


def test_report_reader_keeps_the_heads(reference):
    from fairseq_kd.evaluation.similarity import criterion_config, load_distilled
    from fairseq_kd.criterions.layer_distill import build_targets

    model, cfg = load_distilled(str(OLD / "thin_deep.pt"))
    assert model.hint_heads is not None
    # written before the criterion carried the student's output ids: taken from the model config
    assert [t.name for t in build_targets(criterion_config(cfg))] == ["h1", "h2"]
    with torch.no_grad():
        out = model(source=reference["source"], padding_mask=reference["padding_mask"])
    assert_close(out["hints"], reference["outputs"]["thin_deep"]["hints"], "hints")
