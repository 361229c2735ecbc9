"""The shapes world: the synthetic data and tiny checkpoints the harness ships, and the code that makes them.

* :mod:`shapes.scene` — OpenCV scenes of coloured shapes with exact ground truth, and their questions/captions;
* :mod:`shapes.export` — the exports in each benchmark's own file format (POPE, CHAIR, MME, VCRBench, VQA-Causal);
* :mod:`shapes.pope_build` — POPE's random / popular / adversarial negative sampling;
* :mod:`shapes.tiny` — tiny model builders for every family (tokenizer, config, random init);
* :mod:`shapes.train_data`, :mod:`shapes.train` — the training mixture and the trainer;
* :mod:`shapes.assets` — the CLI that rebuilds what ``assets/`` holds (``python -m shapes.assets world|train|...``).

Nothing here is needed to evaluate a real checkpoint on real data; the engine never imports it.
"""
