# A model built for a small KV cache (compose with a dataset recipe): one K/V head (MQA),
# local windows of 32 bytes in layers 2 and 3, and K/V shared by pairs of layers
# (groups must not mix local and global layers: here {0,1} global, {2,3} local).
#   python train.py config/train_shakespeare_char_cpu.py config/small_kv.py
n_kv_head = 1
window = 32
global_layers = "0,1"
kv_share = 2
out_dir = out_dir + "-small-kv"
