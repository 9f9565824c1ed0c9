# TransformerXL memory: attend to the last 256 tokens of the previous batches of each row
# (compose with a dataset recipe):
#   python train.py config/train_shakespeare_char_cpu.py config/xl.py
xl_mem = 256
out_dir = out_dir + "-xl"
