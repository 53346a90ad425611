//! `gpu-demo`: a producer and a consumer on GPUs, for the GPU scenario and benchmark
//! (`bench/gpu/run.sh` runs it on the GPU machine).
//!
//! `gpu-demo put  --endpoint E --size BYTES --chunks N --seed S [--ns NS]`
//!   fills N chunks of device memory (GPU 0 of what CUDA_VISIBLE_DEVICES shows) with seeded random
//!   bytes and stores them.
//! `gpu-demo get  --endpoint E --size BYTES --chunks N --seed S [--ns NS]`
//!   fetches them into a poisoned device buffer and checks every byte against the seed.
//! `gpu-demo bench --endpoint E --size BYTES --chunks N [--reps R]`
//!   puts and gets N chunks R times from and into device memory; prints GB/s and latencies.
//! `gpu-demo paged --endpoint E --size BYTES --chunks N --fragments F [--reps R]`
//!   chunks of F fragments each, scattered over a device "KV cache" as vLLM pages them; puts
//!   (gather) and gets (scatter into another, poisoned cache) R times; checks every fragment.
//! Every line of output starts with the mode, for the scenario script to grep.

use cudarc::driver::sys as cu;
use prefixd_client::{ChunkKey, Client, ClientOptions, WorkerInit};
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn check(what: &str, r: cu::CUresult) -> BoxResult<()> {
    Ok(prefixd_client::cuda::check(what, r)?)
}

/// The primary context of device 0, current on the calling thread.
struct Gpu {
    ctx: cu::CUcontext,
}
// SAFETY: a context handle can be made current on any thread.
unsafe impl Send for Gpu {}
// SAFETY: as above.
unsafe impl Sync for Gpu {}

impl Gpu {
    fn open() -> BoxResult<Arc<Gpu>> {
        // SAFETY: probing for the driver library only.
        if !unsafe { cu::is_culib_present() } {
            return Err("no CUDA driver".into());
        }
        // SAFETY: driver present; valid out-pointers.
        unsafe {
            check("cuInit", cu::cuInit(0))?;
            let mut dev = 0;
            check("cuDeviceGet", cu::cuDeviceGet(&mut dev, 0))?;
            let mut ctx = std::ptr::null_mut();
            check("cuDevicePrimaryCtxRetain", cu::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
            check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))?;
            Ok(Arc::new(Gpu { ctx }))
        }
    }

    fn current(&self) {
        // SAFETY: retained primary context.
        unsafe { cu::cuCtxSetCurrent(self.ctx) };
    }

    fn alloc(&self, len: usize) -> BoxResult<u64> {
        self.current();
        let mut p = 0;
        // SAFETY: context current; valid out-pointer.
        check("cuMemAlloc", unsafe { cu::cuMemAlloc_v2(&mut p, len) })?;
        Ok(p)
    }

    fn htod(&self, dst: u64, src: &[u8]) -> BoxResult<()> {
        self.current();
        // SAFETY: dst is a device allocation of at least src.len() bytes (callers slice within).
        check("cuMemcpyHtoD", unsafe { cu::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) })
    }

    fn dtoh(&self, dst: &mut [u8], src: u64) -> BoxResult<()> {
        self.current();
        // SAFETY: src is a device allocation of at least dst.len() bytes.
        check("cuMemcpyDtoH", unsafe { cu::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) })
    }
}

struct Args {
    mode: String,
    endpoint: String,
    size: usize,
    chunks: usize,
    seed: u64,
    ns: String,
    reps: usize,
    transports: String,
    fragments: usize,
}

fn parse() -> BoxResult<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or("usage: gpu-demo put|get|bench --endpoint E --size B --chunks N [--seed S]")?;
    let mut a = Args {
        mode,
        endpoint: "http://127.0.0.1:50051".into(),
        size: 36 << 20,
        chunks: 8,
        seed: 1,
        ns: "gpu-demo".into(),
        reps: 5,
        transports: "cuda_ipc,cuda_copy,sm,tcp".into(),
        fragments: 1152,
    };
    while let Some(f) = it.next() {
        let v = it.next().ok_or_else(|| format!("{f} needs a value"))?;
        match f.as_str() {
            "--endpoint" => a.endpoint = v,
            "--size" => a.size = prefixd_bench::parse_size(&v)?,
            "--chunks" => a.chunks = v.parse()?,
            "--seed" => a.seed = v.parse()?,
            "--ns" => a.ns = v,
            "--reps" => a.reps = v.parse()?,
            "--transports" => a.transports = v,
            "--fragments" => a.fragments = v.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(a)
}

fn keys(seed: u64, n: usize, size: usize) -> Vec<ChunkKey> {
    (0..n)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&seed.to_le_bytes());
            k[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            k[16..24].copy_from_slice(&(size as u64).to_le_bytes());
            ChunkKey(k)
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("gpu-demo: {e}");
        std::process::exit(1);
    }
}

async fn run() -> BoxResult<()> {
    let a = parse()?;
    let gpu = Gpu::open()?;
    let g2 = gpu.clone();
    let opts = ClientOptions {
        name: format!("gpu-demo-{}", a.mode),
        transports: a.transports.clone(),
        timeout: Duration::from_secs(120),
        worker_init: Some(WorkerInit(Arc::new(move || g2.current()))),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&a.endpoint, opts).await?;
    let m = &a.mode;
    println!("{m} data path {:?}, endpoint lanes {:?}", client.data_path(), client.endpoint_transports().await?);
    let total = a.size * a.chunks;
    let dev = gpu.alloc(total)?;
    // SAFETY: dev..dev+total is our allocation, never freed in this short-lived process.
    let region = unsafe { client.register_cuda(dev, total) }?;
    let slices: Vec<_> = (0..a.chunks).map(|i| region.slice(i * a.size, a.size)).collect::<Result<_, _>>()?;
    let ks = keys(a.seed, a.chunks, a.size);
    let mut expect = vec![0u8; total];
    ucx_bindings::peer_protocol::fill_random(&mut expect, a.seed);
    match a.mode.as_str() {
        "put" => {
            gpu.htod(dev, &expect)?;
            let t0 = Instant::now();
            let out = client.put_chunks(&a.ns, &ks, None, &slices).await?;
            let s = t0.elapsed().as_secs_f64();
            println!(
                "put stored {} of {} chunks, {:.2} GB/s, {:.2} ms",
                out.stored,
                out.chunks,
                total as f64 / s / 1e9,
                s * 1e3
            );
        }
        "get" => {
            gpu.htod(dev, &vec![0xEE; total])?; // poison: stale bytes would show
            let t0 = Instant::now();
            let hits = client.get_chunks(&a.ns, &ks, &slices).await?;
            let s = t0.elapsed().as_secs_f64();
            let mut got = vec![0u8; total];
            gpu.dtoh(&mut got, dev)?;
            let bad = got.iter().zip(&expect).filter(|(g, e)| g != e).count();
            println!("get hit {hits} of {} chunks, {:.2} GB/s, {:.2} ms", a.chunks, total as f64 / s / 1e9, s * 1e3);
            if hits != a.chunks || bad != 0 {
                return Err(format!("get MISMATCH: {bad} bytes differ, {hits} hits").into());
            }
            println!("get VERIFIED {total} bytes on the device buffer");
        }
        "bench" => {
            gpu.htod(dev, &expect)?;
            let (mut put, mut get, mut vis, mut l2d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for rep in 0..a.reps {
                let ks = keys(a.seed ^ (rep as u64 + 1) << 32, a.chunks, a.size);
                let t0 = Instant::now();
                client.put_chunks(&a.ns, &ks, None, &slices).await?;
                let s = t0.elapsed().as_secs_f64();
                put.push(total as f64 / s / 1e9);
                vis.push(s * 1e3);
                let t0 = Instant::now();
                let hits = client.get_chunks(&a.ns, &ks, &slices).await?;
                let s = t0.elapsed().as_secs_f64();
                if hits != a.chunks {
                    return Err(format!("bench: {hits} of {} hit", a.chunks).into());
                }
                get.push(total as f64 / s / 1e9);
                l2d.push(s * 1e3);
            }
            let mut got = vec![0u8; total];
            gpu.dtoh(&mut got, dev)?;
            if got != expect {
                return Err("bench: data changed on the round trip".into());
            }
            let med = |v: Vec<f64>| prefixd_bench::median(v);
            println!(
                "bench size={} chunks={} put_gbs={:.1} get_gbs={:.1} put_to_visible_ms={:.3} lookup_to_data_ms={:.3}",
                a.size,
                a.chunks,
                med(put),
                med(get),
                med(vis),
                med(l2d)
            );
        }
        "paged" => paged(&client, &gpu, &a).await?,
        other => return Err(format!("unknown mode {other}").into()),
    }
    client.close().await.ok();
    Ok(())
}

/// Fisher-Yates with xorshift: the same seed, the same page placement.
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

async fn paged(client: &Client, gpu: &Gpu, a: &Args) -> BoxResult<()> {
    use prefixd_client::Fragment;
    let (f, n) = (a.fragments.max(1), a.chunks);
    let flen = a.size / f;
    let blocks = 2 * f * n; // a cache twice the size of what we move, pages scattered over it
    let cache_len = blocks * flen;
    let src = gpu.alloc(cache_len)?;
    let dst = gpu.alloc(cache_len)?;
    let mut host = vec![0u8; cache_len];
    ucx_bindings::peer_protocol::fill_random(&mut host, a.seed);
    gpu.htod(src, &host)?;
    let (src_pages, dst_pages) = (shuffled(blocks, a.seed), shuffled(blocks, a.seed ^ 0xfeed));
    let frags = |base: u64, pages: &[usize], c: usize| -> Vec<Fragment> {
        (0..f).map(|j| Fragment { ptr: base + (pages[c * f + j] * flen) as u64, len: flen }).collect()
    };
    let src_frags: Vec<Vec<Fragment>> = (0..n).map(|c| frags(src, &src_pages, c)).collect();
    let dst_frags: Vec<Vec<Fragment>> = (0..n).map(|c| frags(dst, &dst_pages, c)).collect();
    let total = (flen * f * n) as f64;
    let (mut put, mut get) = (Vec::new(), Vec::new());
    for rep in 0..a.reps.max(1) {
        gpu.htod(dst, &vec![0xEE; cache_len])?; // poison
        let ks = keys(a.seed ^ 0x9a9e ^ ((rep as u64 + 1) << 40) ^ ((n as u64) << 48), n, a.size);
        let t0 = Instant::now();
        client.put_paged(&a.ns, &ks, None, &src_frags).await?;
        put.push(total / t0.elapsed().as_secs_f64() / 1e9);
        let t0 = Instant::now();
        let hits = client.get_paged(&a.ns, &ks, &dst_frags).await?;
        get.push(total / t0.elapsed().as_secs_f64() / 1e9);
        if hits != n {
            return Err(format!("paged: {hits} of {n} chunks hit").into());
        }
    }
    // Every fragment landed where the scatter put it, with the bytes the gather took.
    let mut got = vec![0u8; cache_len];
    gpu.dtoh(&mut got, dst)?;
    let mut bad = 0usize;
    for c in 0..n {
        for j in 0..f {
            let (s, d) = (src_pages[c * f + j] * flen, dst_pages[c * f + j] * flen);
            if got[d..d + flen] != host[s..s + flen] {
                bad += 1;
            }
        }
    }
    if bad > 0 {
        return Err(format!("paged MISMATCH: {bad} of {} fragments differ", n * f).into());
    }
    println!(
        "paged size={} fragments={f}x{flen} chunks={n} put_gbs={:.1} get_gbs={:.1} VERIFIED {} fragments",
        flen * f,
        prefixd_bench::median(put),
        prefixd_bench::median(get),
        n * f
    );
    Ok(())
}
