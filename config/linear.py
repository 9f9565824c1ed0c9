# Linear attention in every layer (compose with a dataset recipe):
#   python train.py config/train_shakespeare_char_cpu.py config/linear.py
attention = "linear"
linear_norm = "layernorm"  # normalise each head's output; "denominator" is the paper's
out_dir = out_dir + "-linear"
