"""SFT layout, loss masking through SeqIO's prefix-LM converter, boxes as
text, and instruction-record preparation (with a tiny random VQ-GAN and BPE)."""
from __future__ import annotations

import json
import os

import gin
import pytest

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.sft import format as fmt


def test_layout_by_hand():
    inputs, targets = fmt.layout([100, 101], [70, 71, 72], [80, 81])
    assert inputs.tolist() == [100, 101, 2, 70, 71, 72, 2]
    assert targets.tolist() == [80, 81, 1]
    inputs, targets = fmt.layout([100], [], [70])
    assert inputs.tolist() == [100, 2] and targets.tolist() == [70, 1]
    full, image_only, neither = fmt.prompt_streams([100, 101], [70, 71], mask_id=4)
    assert full == [100, 101, 2, 70, 71, 2]
    assert image_only == [4, 2, 70, 71, 2]
    assert neither == [4, 2, 4, 2]
    assert fmt.prompt_streams([100], [], mask_id=4)[2] == [4, 2]


def test_boxes_round_trip_and_iou_by_hand():
    a = fmt.Box("red circle", 0.0, 0.0, 0.5, 0.5)
    b = fmt.Box("blue square", 0.5, 0.25, 1.0, 0.75)
    text = fmt.boxes_to_text([b, a], num_bins=32)
    # raster order: a (y0 = 0) before b (y0 = 8); x1 = ceil(0.5 * 32) - 1 = 15
    assert text == "red circle 0 0 15 15, blue square 16 8 31 23"
    back = fmt.text_to_boxes(text + ", garbage, green star 40 0 1 1", num_bins=32)
    assert [x.label for x in back] == ["red circle", "blue square"]  # out-of-range piece dropped
    assert back[0] == fmt.Box("red circle", 0.0, 0.0, 0.5, 0.5)
    # IoU by hand: [0, 2]x[0, 2] vs [1, 3]x[0, 2]: inter 2, union 6
    assert fmt.iou(fmt.Box("x", 0, 0, 2, 2), fmt.Box("x", 1, 0, 3, 2)) == pytest.approx(1 / 3)
    # matching respects labels and leaves an unmatched truth at 0
    truth = [fmt.Box("a", 0, 0, 1, 1), fmt.Box("b", 2, 2, 3, 3)]
    pred = [fmt.Box("b", 2, 2, 3, 3), fmt.Box("c", 0, 0, 1, 1)]
    assert fmt.matched_iou(truth, pred) == [0.0, 1.0]
    # centre crop of a 200 x 100 image: 50 px cut on each side
    box = fmt.crop_box([60, 10, 40, 50], 200, 100, "dog")
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((0.1, 0.1, 0.5, 0.6))
    assert fmt.crop_box([0, 0, 40, 40], 200, 100, "gone") is None


def _write_fake_sft(tmp_path, vocab: vocab_lib.UnifiedVocabulary):
    """A prepared SFT dataset written directly (two VQA-like and one spatial
    record), so the SeqIO task is tested without tokenizers."""
    import tensorflow as tf

    from cm3leon_jax.sft import records

    out = tmp_path / "sft"
    rows = {"vqa": [([300, 301, 302], [70, 71, 72, 73], [400, 401]), ([303], [74, 75, 76, 77], [402])],
            "spatial": [([304, 305], [], [78, 79, 80, 81])]}
    for family, exs in rows.items():
        os.makedirs(out / family)
        with tf.io.TFRecordWriter(str(out / family / "train-00000-of-00001.tfrecord")) as w:
            for i, (ins, inp, o) in enumerate(exs):
                w.write(records._example(ins, inp, o, family, f"{family}-{i}", {"n": i}))
    man = {"format_version": records.FORMAT_VERSION,
           "vocabulary": {"num_special_tokens": vocab.num_special_tokens, "num_mask_tokens": vocab.num_mask_tokens,
                          "image_codebook_size": vocab.image_codebook_size, "text_vocab_size": vocab.text_vocab_size},
           "models": {}, "splits": {"train": {"count": 3, "families": {
               "vqa": {"count": 2, "max_inputs_length": 9, "max_targets_length": 3},
               "spatial": {"count": 1, "max_inputs_length": 3, "max_targets_length": 5}}}}}
    with open(out / "sft.json", "w") as f:
        json.dump(man, f)
    return str(out)


@pytest.fixture
def sft_task(tmp_path):
    import seqio

    from cm3leon_jax.sft import tasks

    vocab = vocab_lib.UnifiedVocabulary(image_codebook_size=256, text_vocab_size=448)
    data = _write_fake_sft(tmp_path, vocab)
    tasks.register_sft_task("test_sft_vqa", data, "vqa", replace=True)
    tasks.register_sft_task("test_sft_spatial", data, "spatial", condition_dropout=0.0, replace=True)
    yield data
    seqio.TaskRegistry.remove("test_sft_vqa")
    seqio.TaskRegistry.remove("test_sft_spatial")


def _batches(name, lengths, batch_size=2, n=1):
    from cm3leon_jax.data import pipeline

    it = pipeline.TrainIterator(name, lengths, batch_size, seed=0, pack=False)
    return [next(it) for _ in range(n)]


def test_instruction_tokens_have_zero_loss_weight_by_default(sft_task):
    gin.clear_config()
    (batch,) = _batches("test_sft_vqa", {"inputs": 10, "targets": 4})
    for row in range(2):
        tgt, w = batch["decoder_target_tokens"][row], batch["decoder_loss_weights"][row]
        n_in = 9 if tgt[0] == 300 else 5  # instruction <break> input <break>
        n_out = 3 if tgt[0] == 300 else 2  # output <eos>
        assert tgt[n_in - 1] == vocab_lib.BREAK_ID and tgt[n_in + n_out - 1] == vocab_lib.EOS_ID
        assert w[:n_in].tolist() == [0] * n_in                  # instruction + input: no loss
        assert w[n_in:n_in + n_out].tolist() == [1] * n_out      # output + <eos>: full weight
        assert w[n_in + n_out:].sum() == 0                       # padding


def test_loss_on_every_token_when_gin_says_so(sft_task):
    gin.clear_config()
    gin.bind_parameter("sft_feature_converter.loss_on_targets_only", False)
    try:
        (batch,) = _batches("test_sft_vqa", {"inputs": 10, "targets": 4})
    finally:
        gin.clear_config()
    for row in range(2):
        tgt, w = batch["decoder_target_tokens"][row], batch["decoder_loss_weights"][row]
        real = int((tgt != 0).sum())
        assert w[:real].tolist() == [1] * real and w[real:].sum() == 0


def test_lengths_shorter_than_the_data_are_refused(sft_task):
    with pytest.raises(ValueError, match="shorter than the longest inputs"):
        _batches("test_sft_vqa", {"inputs": 6, "targets": 4})


def test_task_without_input_and_decoder_length(sft_task):
    from cm3leon_jax.data import pipeline

    assert pipeline.decoder_length("test_sft_spatial", {"inputs": 10, "targets": 6}) == 16
    with pytest.raises(ValueError, match="needs both"):
        pipeline.decoder_length("test_sft_spatial", {"targets": 6})
    (batch,) = _batches("test_sft_spatial", {"inputs": 4, "targets": 6}, batch_size=1)
    assert batch["decoder_target_tokens"][0][:8].tolist() == [304, 305, 2, 78, 79, 80, 81, 1]
    assert batch["decoder_loss_weights"][0][:8].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_a_family_the_data_lacks_reads_as_empty_when_shuffled(sft_task):
    """corpus_sft_mixture over data without one family (no recipe makes
    'grounded') gives that family rate 0; its source must read as empty, not
    fail in tf.data's shuffle(buffer_size=0)."""
    import seqio

    from cm3leon_jax.sft import tasks

    tasks.register_sft_task("test_sft_captioning", sft_task, "captioning", replace=True)
    try:
        source = seqio.get_mixture_or_task("test_sft_captioning").source
        assert list(source.get_dataset("train", shuffle=True, seed=0)) == []
    finally:
        seqio.TaskRegistry.remove("test_sft_captioning")


def test_condition_dropout_replaces_conditions_with_mask(tmp_path):
    import tensorflow as tf

    from cm3leon_jax.sft import tasks

    ds = tf.data.Dataset.from_tensors({"instruction": tf.constant([300, 301], tf.int32),
                                       "input": tf.constant([70, 71], tf.int32),
                                       "output": tf.constant([72], tf.int32), "task": tf.constant("editing")})
    ds = ds.repeat(600).enumerate().map(lambda i, ex: dict(ex, _seed=i))
    seen = {"both": 0, "text": 0, "input": 0, "none": 0}
    out = tasks.sft_layout(ds.map(lambda ex: {k: v for k, v in ex.items() if k != "_seed"}),
                           condition_dropout=0.1, image_output=True)
    for ex in out.as_numpy_iterator():
        inputs = ex["inputs"].tolist()
        key = {(True, True): "none", (False, True): "text", (True, False): "input", (False, False): "both"}[
            (inputs[:2] == [300, 301], inputs[-3:-1] == [70, 71])]
        seen[key] += 1
        assert ex["targets"].tolist() == [72, 1]
    # 10% each of text-only, input-only and both dropped: about 60 each of 600
    assert 30 <= seen["text"] <= 95 and 30 <= seen["input"] <= 95 and 30 <= seen["both"] <= 95
    assert seen["none"] >= 380


def test_shapes_mixture_rates_default_and_gin_override():
    import seqio

    from cm3leon_jax.sft import tasks as sft_tasks

    mix = seqio.get_mixture_or_task("shapes_sft_mixture")
    rates = {t.source.family: mix.get_rate(t) for t in mix.tasks}
    assert rates == sft_tasks.SHAPES_RATES
    with gin.unlock_config():
        gin.bind_parameter("shapes_sft_rates.rates", {"vqa": 10.0, "spatial": 0.0})
    try:
        rates = {t.source.family: mix.get_rate(t) for t in mix.tasks}
        assert rates["vqa"] == 10.0 and rates["spatial"] == 0.0 and rates["editing"] == sft_tasks.SHAPES_RATES["editing"]
        with gin.unlock_config():
            gin.bind_parameter("shapes_sft_rates.rates", {"painting": 1.0})
        with pytest.raises(ValueError, match="unknown SFT task family 'painting'"):
            mix.get_rate(mix.tasks[0])
    finally:
        gin.clear_config()
