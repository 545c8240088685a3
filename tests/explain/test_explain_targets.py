"""The tiny targets the explain tests share (tests/explain_fixtures.py) learned their tasks: the other files'
assertions about "what the model uses" rely on it."""

from __future__ import annotations

from explain_fixtures import digit_data, sentence_data, trained_bert_target, trained_cnn_target


def test_trained_targets_learned(tiny_bert_dir):
    bert, cnn = trained_bert_target(str(tiny_bert_dir)), trained_cnn_target()
    data = sentence_data()
    assert (bert.logits_texts(data.texts).argmax(1) == data.labels).mean() > 0.9
    images = digit_data()
    assert (cnn.logits_images(images.images).argmax(1) == images.labels).mean() > 0.9
