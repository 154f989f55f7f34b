"""The bundled demo model's world: synthetic clips, the pretraining stand-ins for CLIP and LLaMA, the
trained tokenizer and the recipes that make valley_rt/assets/demo (see docs/demo_model.md).

Nothing in the runtime or the export imports this package; training a real Valley needs only
valley_rt.train.
"""
