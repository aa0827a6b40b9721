"""Quantized weights as data: the number formats dsserve holds them in (`quantization.py`: schemes, quantizing, the
plain-torch twins every quantized kernel is tested against) and the checkpoint formats other engines publish
(`quantized.py`: detection and conversion to those forms)."""
