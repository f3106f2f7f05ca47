"""S-BERT: the siamese training of the sentence encoder of bert/ (`python -m sbert.train`, on train/'s loop and
helpers), its evaluation (`python -m sbert.evaluate`) and threshold calibration. The memory store that uses it is
the app layer's (chat/memory.py).
"""
