//! Useful functions for checking features.

pub fn get_num_threads() -> usize {
    // The threads of the rayon pool this runs in: the global pool (sized by
    // `RAYON_NUM_THREADS`, as the published crate read it), or the pool a caller installed to
    // give this work its own share of the cores.
    rayon::current_num_threads()
}

pub fn has_accelerate() -> bool {
    cfg!(feature = "accelerate")
}

pub fn has_mkl() -> bool {
    cfg!(feature = "mkl")
}

pub fn cuda_is_available() -> bool {
    cfg!(feature = "cuda")
}

pub fn metal_is_available() -> bool {
    cfg!(feature = "metal")
}

pub fn with_avx() -> bool {
    cfg!(target_feature = "avx2")
}

pub fn with_neon() -> bool {
    cfg!(target_feature = "neon")
}

pub fn with_simd128() -> bool {
    cfg!(target_feature = "simd128")
}

pub fn with_f16c() -> bool {
    cfg!(target_feature = "f16c")
}
