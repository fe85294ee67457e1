//! Micro-benchmarks of the pure protocol code: the mux frame codec and the
//! destination grammar. `cargo bench --bench codec`.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::net::Ipv4Addr;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use maintgate::dest::parse_target;
use maintgate::mux::{Frame, Target};

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let data = Bytes::from(vec![0xA5u8; 16 * 1024]);

    // What the writer does per message: four 16 KiB DATA frames coalesced.
    g.throughput(Throughput::Bytes(4 * data.len() as u64));
    g.bench_function("encode 4x16KiB DATA", |b| {
        let mut buf = BytesMut::with_capacity(80 * 1024);
        b.iter(|| {
            for id in 1..=4 {
                Frame::Data {
                    id,
                    data: data.clone(),
                }
                .encode(&mut buf);
            }
            black_box(buf.split().freeze())
        });
    });

    let mut msg = BytesMut::new();
    for id in 1..=4 {
        Frame::Data {
            id,
            data: data.clone(),
        }
        .encode(&mut msg);
    }
    let msg = msg.freeze();
    g.bench_function("decode 4x16KiB DATA", |b| {
        b.iter(|| {
            let mut m = msg.clone();
            let mut n = 0;
            while let Ok(Some(f)) = Frame::decode(&mut m) {
                n += f.stream_id();
            }
            black_box(n)
        });
    });

    // Control traffic: a batch of credit updates and an OPEN.
    let mut ctl = BytesMut::new();
    for id in 1..=32 {
        Frame::Window {
            id,
            increment: 65_536,
        }
        .encode(&mut ctl);
    }
    Frame::Open {
        id: 33,
        target: Target::CoLocated(Ipv4Addr::new(10, 0, 0, 5), 3389),
        window: 262_144,
    }
    .encode(&mut ctl);
    let ctl = ctl.freeze();
    g.throughput(Throughput::Elements(33));
    g.bench_function("decode 32 WINDOW + OPEN", |b| {
        b.iter(|| {
            let mut m = ctl.clone();
            let mut n = 0;
            while let Ok(Some(f)) = Frame::decode(&mut m) {
                n += f.stream_id();
            }
            black_box(n)
        });
    });
    g.finish();
}

fn grammar(c: &mut Criterion) {
    let mut g = c.benchmark_group("dest");
    let domain = "maint.example.com";
    for (name, target) in [
        ("customer", "1234.maint.example.com:22"),
        ("system+ip", "1234-ipo2-10.0.0.5.maint.example.com:3389"),
        ("rejected", "1234-ipo2-0127.0.0.1.maint.example.com:22"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(parse_target(black_box(target), domain).is_ok()))
        });
    }
    g.finish();
}

criterion_group!(benches, frames, grammar);
criterion_main!(benches);
