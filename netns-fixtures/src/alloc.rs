//! [`CountingAlloc`]: a global allocator that measures how much memory a
//! piece of code holds at its peak, for tests that check a parser's memory
//! stays proportional to its input.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: netns_fixtures::CountingAlloc = netns_fixtures::CountingAlloc;
//!
//! let (result, peak) = netns_fixtures::peak_alloc(|| parse(input));
//! assert!(peak <= 64 * input.len() + 65536);
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting the bytes each thread holds. Counts are
/// per thread, so tests running in parallel do not disturb each other; only
/// [`peak_alloc`] reads them.
pub struct CountingAlloc;

thread_local! {
    // const-initialised Cells: reading them never allocates and needs no
    // destructor, so the allocator may touch them at any time.
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(n);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrink(n: usize) {
    // Memory allocated on another thread may be freed here: saturate.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded to `System` unchanged; the counting only
// touches thread-local Cells.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrink(layout.size());
            grow(new_size);
        }
        p
    }
}

/// Runs `f` and returns its result and the most memory the calling thread
/// held during the call beyond what it held before (in bytes). Meaningful
/// only with [`CountingAlloc`] installed as the global allocator; 0 without.
pub fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, peak.saturating_sub(before))
}
