"""Temporary CUDA-path check for MODEL-A (deleted after use)."""
import sys, time, torch
from pathlib import Path
from core.model.api import *
from core.model.runtime import UniCharacterRuntime
from core.model.tiny import write_tiny_model
from core.model.sampling import sample_next

def sync(): torch.cuda.synchronize()
d = write_tiny_model(Path("/tmp/tiny"))
cpu = UniCharacterRuntime.load(d, device="cpu")
gpu32 = UniCharacterRuntime.load(d, device="cuda", dtype="float32")
gpu = UniCharacterRuntime.load(d, device="cuda")
ctx = [TextSegment("hello there, what is up")]
p = TextParams(max_new_tokens=10, temperature=0.0)
print("tiny text cpu/gpu32/bf16:", repr(cpu.generate_text(ctx, p)), repr(gpu32.generate_text(ctx, p)), repr(gpu.generate_text(ctx, p)))
img = gpu.generate_image(ImageContexts(cond=[TextSegment("a cat")]), ImageParams(width=64, height=64, num_timesteps=5, seed=1))
print("tiny image", img.size)
from PIL import Image
import numpy as np
ph = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
print("tiny vqa", repr(gpu.generate_text([ImageSegment(ph), TextSegment("what?")], p)))
print("tiny edit", gpu.generate_image(ImageContexts(cond=[ImageSegment(ph, vae=True), TextSegment("x")], text_uncond=[ImageSegment(ph, vae=True)], image_uncond=[TextSegment("x")]), ImageParams(width=64, height=64, num_timesteps=4, cfg_img_scale=2.0, seed=1)).size)
del cpu, gpu32, gpu
compile_k = len(sys.argv) > 1
t = time.time()
rt = UniCharacterRuntime.random(device="cuda", compile_kernels=compile_k)
sync(); print(f"full random build {time.time()-t:.1f}s, mem {torch.cuda.memory_allocated()/2**30:.1f} GiB")
ids = list(range(1, 511))
with torch.inference_mode():
    dec = rt._decoder
    from core.model.runtime import _TextBlock
    for rep in range(2):
        sync(); t = time.time()
        done = rt._prefill([_TextBlock(ids)], dec.reserve(512 + 300), 0, 0); sync(); tp = time.time() - t
        dec.start(510, 5, done.rope)
        t = time.time()
        for i in range(256):
            nxt = sample_next(dec.step(), temperature=0.0); int(nxt); dec.advance(nxt)
        sync(); td = time.time() - t
        print(f"prefill 510 tok {tp*1000:.1f} ms; decode {256/td:.1f} tok/s ({td/256*1000:.2f} ms/tok)")
for steps in (6, 50):
    torch.cuda.reset_peak_memory_stats(); sync(); t = time.time()
    im = rt.generate_image(ImageContexts(cond=[TextSegment("a photo of a cat " * 3)]), ImageParams(num_timesteps=steps, seed=0))
    sync(); print(f"1024 image {steps} steps: {time.time()-t:.2f}s peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", im.size)
