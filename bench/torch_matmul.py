"""The matmul shapes of a `20m` training step in PyTorch on 2 threads, as
`cargo run --release -p rho-model --example matmul_shapes` times them in candle
(`512 1376 32000 8` as arguments: the 60M model's hidden, MLP, vocabulary and heads)."""
import torch, time
torch.set_num_threads(2)
def t(name, f, flops):
    f(); f()
    n=10; s=time.perf_counter()
    for _ in range(n): f()
    e=(time.perf_counter()-s)/n
    print(f"{name}: {flops/e/1e9:.1f} GFLOP/s ({e*1e3:.2f} ms)")
import sys
d,ff,V,H=map(int,sys.argv[1:5]) if len(sys.argv)>1 else (384,1024,8192,6)
N=2048; B=4*H
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
q=torch.randn(B,512,64); k=torch.randn(B,512,64); p=torch.randn(B,512,512)
t("q@k.T",lambda: q@k.transpose(1,2), 2*B*512*512*64)
t("p@v",lambda: p@k, 2*B*512*512*64)
