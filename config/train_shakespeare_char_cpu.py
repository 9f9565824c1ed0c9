# A small recipe for a laptop CPU: a 4-layer, 4-head, 128-wide model on tiny-shakespeare.
#   python train.py config/train_shakespeare_char_cpu.py
#   python sample.py --out_dir=out-shakespeare-char-cpu --kv_window=64   # the 64-byte context it was trained on

out_dir = "out-shakespeare-char-cpu"
eval_interval = 500
eval_iters = 50  # 50 batches x 12 windows of 64 bytes: a cheaper estimate than the GPU recipe's
log_interval = 50

dataset = "shakespeare_char"
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small to overfit in this many iterations

learning_rate = 2e-3  # 2e-3 beat 1e-3 (val 1.566 vs 1.600 at iteration 4500, on the val rows of before eval_windows)
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"  # the figures in the README were measured on a CPU; --device= picks another
