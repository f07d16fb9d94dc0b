"""Drop-in adapters with the anchor projects' call signatures (DeepGEMM, FlashMLA, DeepEP) over dsv3.ops."""
