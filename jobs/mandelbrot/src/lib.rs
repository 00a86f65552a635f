//! Render the Mandelbrot set, one taskunit per image row; `combine` writes a
//! grayscale PNG.
//!
//! The input is one line `WIDTH HEIGHT MAX_ITER` (empty input: `800 600 256`).
//! The PNG encoder is a few lines of stored (uncompressed) deflate, so the
//! guest needs no dependencies beyond the bindings.

wit_bindgen::generate!({ path: "../../wit", world: "job" });

use antnest::job::host;

struct Mandelbrot;

fn read_all_input() -> Vec<u8> {
    let mut input = Vec::new();
    loop {
        let block = host::read_input(64 * 1024);
        if block.is_empty() {
            return input;
        }
        input.extend_from_slice(&block);
    }
}

fn parse_numbers(text: &str, want: usize) -> Result<Vec<u32>, String> {
    let numbers: Vec<u32> = text
        .split_ascii_whitespace()
        .map(|w| w.parse::<u32>().map_err(|e| format!("{w:?}: {e}")))
        .collect::<Result<_, _>>()?;
    if numbers.len() != want {
        return Err(format!("expected {want} numbers, got {text:?}"));
    }
    Ok(numbers)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream made of stored deflate blocks.
fn zlib_stored(raw: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    if blocks.is_empty() {
        z.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in raw {
        a = (a + byte as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    z
}

impl Guest for Mandelbrot {
    fn split() -> Result<bool, String> {
        let input = String::from_utf8(read_all_input()).map_err(|e| e.to_string())?;
        let input = if input.trim().is_empty() {
            "800 600 256"
        } else {
            input.trim()
        };
        let [w, h, iter] = parse_numbers(input, 3)?[..] else {
            unreachable!()
        };
        if w == 0 || h == 0 || w > 16_384 || h > 16_384 {
            return Err(format!("image size {w}x{h} is out of range (1..=16384)"));
        }
        for y in 0..h {
            host::emit(format!("{y} {w} {h} {iter}").as_bytes());
        }
        Ok(true)
    }

    fn process(unit: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(&unit).map_err(|e| e.to_string())?;
        let [y, w, h, iter] = parse_numbers(text, 4)?[..] else {
            unreachable!()
        };
        let scale = 3.0 / w.min(h) as f64;
        let ci = (y as f64 - h as f64 / 2.0) * scale;
        let row = (0..w)
            .map(|x| {
                let cr = (x as f64 - w as f64 * 0.65) * scale;
                let (mut zr, mut zi, mut n) = (0.0f64, 0.0f64, 0);
                while n < iter && zr * zr + zi * zi <= 4.0 {
                    (zr, zi) = (zr * zr - zi * zi + cr, 2.0 * zr * zi + ci);
                    n += 1;
                }
                if n == iter {
                    0
                } else {
                    255 - (n * 255 / iter.max(1)) as u8
                }
            })
            .collect();
        Ok(row)
    }

    fn combine() -> Result<bool, String> {
        let mut raw = Vec::new();
        let (mut width, mut height) = (None, 0u32);
        while let Some(row) = host::next_result() {
            if *width.get_or_insert(row.len()) != row.len() {
                return Err("rows of different widths".into());
            }
            raw.push(0); // filter type: none
            raw.extend_from_slice(&row);
            height += 1;
        }
        let width = width.ok_or("no rows to combine")? as u32;
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grayscale
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &zlib_stored(&raw));
        chunk(&mut png, b"IEND", &[]);
        host::write_output(&png);
        Ok(true)
    }
}

export!(Mandelbrot);
