"""The matmul shapes of a `20m` training step in PyTorch on 2 threads, as
`cargo run --release -p rho-model --example matmul_shapes` times them in candle."""
import torch, time
torch.set_num_threads(2)
def t(name, f, flops):
    f(); f()
    n=10; s=time.perf_counter()
    for _ in range(n): f()
    e=(time.perf_counter()-s)/n
    print(f"{name}: {flops/e/1e9:.1f} GFLOP/s ({e*1e3:.2f} ms)")
N,d,ff,V=2048,384,1024,8192
x=torch.randn(N,d); w=torch.randn(ff,d); wq=torch.randn(d,d); h=torch.randn(N,ff); wd=torch.randn(d,ff); wl=torch.randn(V,d)
dy=torch.randn(N,ff); dyl=torch.randn(N,V)
t("x@wq.T",lambda: x@wq.t(), 2*N*d*d)
t("x@w.T (gate)",lambda: x@w.t(), 2*N*d*ff)
t("h@wd.T (down)",lambda: h@wd.t(), 2*N*d*ff)
t("x@wl.T (lm)",lambda: x@wl.t(), 2*N*d*V)
t("dy@w (dx gate)",lambda: dy@w, 2*N*d*ff)
t("dy.T@x (dW gate)",lambda: dy.t()@x, 2*N*d*ff)
t("dyl@wl (dx lm)",lambda: dyl@wl, 2*N*d*V)
t("dyl.T@x (dW lm)",lambda: dyl.t()@x, 2*N*d*V)
q=torch.randn(24,512,64); k=torch.randn(24,512,64); p=torch.randn(24,512,512)
t("q@k.T",lambda: q@k.transpose(1,2), 2*24*512*512*64)
t("p@v",lambda: p@k, 2*24*512*512*64)
