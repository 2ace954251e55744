"""Building blocks for model code: linear (with a quant method), rotary, norm, embedding, attention."""
