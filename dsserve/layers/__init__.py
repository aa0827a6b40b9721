"""The maths of one model layer at a time: linear, norm, rotary, attention over the paged cache, MoE; plain torch."""
