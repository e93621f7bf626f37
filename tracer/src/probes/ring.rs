//! Reads a BPF ring buffer map in batches: every record up to the producer's position, and
//! only then tells the kernel how far it read.
//!
//! aya's `RingBuf` publishes the consumer position after each record. The kernel reads that
//! position on every reservation, so under a flood each record read made the producing CPU
//! fetch the line back from the reading CPU, inside the TC program's run on the packet's
//! path. Here the position is published once per drain (and every eighth of the ring within
//! a long one, so producers never wait for a whole drain to get space back).

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::MapData;

/// The kernel's `struct bpf_ringbuf_hdr`: a length word with these two flags, then the page
/// offset, which userspace does not need.
const HEADER_BYTES: usize = 8;
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;

/// One mapping of the ring's memory, unmapped when dropped.
struct Mapping {
    address: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(map: &MapData, len: usize, protection: libc::c_int, offset: usize) -> Result<Self> {
        let offset = libc::off_t::try_from(offset).context("ring buffer mapping offset")?;
        // SAFETY: a fresh shared mapping of the map's fd, at an address the kernel chooses;
        // nothing else refers to that range.
        let address = unsafe { libc::mmap(std::ptr::null_mut(), len, protection, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), offset) };
        ensure!(address != libc::MAP_FAILED, "mapping the ring buffer: {}", std::io::Error::last_os_error());
        Ok(Self { address: NonNull::new(address).context("the kernel mapped the ring buffer at address 0")?, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range `new` mapped, which no reference outlives (`EventRing` hands out
        // records only for the duration of a callback).
        unsafe { libc::munmap(self.address.as_ptr(), self.len) };
    }
}

/// A ring buffer map, read from its memory.
pub struct EventRing {
    map: MapData,
    /// The consumer position's page, the only one userspace writes.
    consumer: Mapping,
    /// The producer position's page, then the data pages, mapped twice in a row by the kernel
    /// so that a record that wraps around the end reads as one slice.
    producer: Mapping,
    page_size: usize,
    mask: usize,
    /// How far this reader has read.
    position: usize,
    /// The position last published to the kernel.
    published: usize,
}

impl EventRing {
    pub fn new(map: MapData) -> Result<Self> {
        let size = usize::try_from(map.info().context("reading the ring buffer's size")?.max_entries())?;
        // SAFETY: sysconf has no preconditions.
        let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).context("the page size")?;
        ensure!(size.is_power_of_two() && size >= page_size, "a ring buffer of {size} bytes is not a power of two of pages");
        let consumer = Mapping::new(&map, page_size, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(&map, page_size + 2 * size, libc::PROT_READ, page_size)?;
        let mut ring = Self { map, consumer, producer, page_size, mask: size - 1, position: 0, published: 0 };
        ring.position = ring.consumer_position().load(Ordering::Acquire);
        ring.published = ring.position;
        Ok(ring)
    }

    fn consumer_position(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the kernel's `consumer_pos`, an aligned
        // unsigned long that the kernel only reads; the mapping lives as long as `self`.
        unsafe { self.consumer.address.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_position(&self) -> &AtomicUsize {
        // SAFETY: the producer page starts with the kernel's `producer_pos`, an aligned
        // unsigned long that the kernel writes atomically; the mapping lives as long as `self`.
        unsafe { self.producer.address.cast::<AtomicUsize>().as_ref() }
    }

    /// Calls `record` with each committed record, oldest first, until the ring is empty or
    /// the oldest record is still being written; then publishes how far it read.
    pub fn drain(&mut self, mut record: impl FnMut(&[u8])) {
        let release_every = (self.mask + 1) / 8;
        loop {
            let produced = self.producer_position().load(Ordering::Acquire);
            if self.position == produced {
                break;
            }
            while self.position != produced {
                let offset = self.position & self.mask;
                // SAFETY: `offset` is within the first copy of the data pages, and a header is
                // 8-byte aligned there; the kernel commits it with a fully ordered exchange,
                // which this Acquire load pairs with, so the record's bytes are visible once
                // the busy bit is clear.
                let header = unsafe { self.data().add(offset).cast::<AtomicU32>().as_ref() }.load(Ordering::Acquire);
                if header & BUSY_BIT != 0 {
                    self.publish();
                    return;
                }
                let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
                if header & DISCARD_BIT == 0 {
                    // SAFETY: the kernel bounds a record by the ring's size, and the data pages
                    // are mapped twice in a row, so `offset + 8 + len` stays inside the mapping.
                    // The record's space is not handed back before the position is published,
                    // after `record` returns.
                    record(unsafe { std::slice::from_raw_parts(self.data().add(offset + HEADER_BYTES).as_ptr(), len) });
                }
                self.position += (HEADER_BYTES + len).next_multiple_of(8);
                if self.position.wrapping_sub(self.published) >= release_every {
                    self.publish();
                }
            }
        }
        self.publish();
    }

    fn data(&self) -> NonNull<u8> {
        // SAFETY: the data pages start one page into the producer mapping.
        unsafe { self.producer.address.cast::<u8>().add(self.page_size) }
    }

    fn publish(&mut self) {
        if self.published != self.position {
            // Release: the records read are done with before the kernel may reuse their space.
            self.consumer_position().store(self.position, Ordering::Release);
            self.published = self.position;
        }
    }
}

/// The map's fd, which polls readable when the kernel wakes the reader.
impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

// SAFETY: the mappings are plain shared memory owned by this value; moving it to another
// thread moves the only references to them.
unsafe impl Send for EventRing {}
