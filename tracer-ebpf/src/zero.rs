//! Zeroing of per-CPU scratch records without `memset`.
//!
//! LLVM turns `*record = T::default()` into a `memset` call, and on BPF that is a loop storing
//! one byte at a time (five instructions a byte): over a thousand instructions for a 208-byte
//! `KernelEvent`, on every drop. Word stores, volatile so that LLVM cannot turn them back into
//! that call, take a fourth or an eighth as many stores, unrolled, with no loop.

/// Zeroes `*record` with 64-bit stores where it is 8-aligned, else 32-bit ones. `T` must be
/// plain old data whose all-zero bytes are its `Default` (the records' fields are integers
/// and byte arrays), 4-aligned and a multiple of 4 bytes long, which the const assertion
/// checks.
#[inline(always)]
pub fn zero<T: Copy>(record: &mut T) {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    if align_of::<T>() >= 8 && size_of::<T>() % 8 == 0 {
        zero_words::<T, u64>(record);
    } else {
        zero_words::<T, u32>(record);
    }
}

/// Zeroes `*record` one `W` at a time; `record` is `W`-aligned and a multiple of `W` long.
#[inline(always)]
fn zero_words<T, W: Default>(record: &mut T) {
    let words = (record as *mut T).cast::<W>();
    let mut index = 0;
    while index < size_of::<T>() / size_of::<W>() {
        // SAFETY: `index` words into `*record`, which holds size_of::<T>() / size_of::<W>()
        // of them at a W-aligned address (checked by `zero`); zero bytes are a valid T.
        unsafe { words.add(index).write_volatile(W::default()) };
        index += 1;
    }
}
