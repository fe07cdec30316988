//! The binary encoding of a [`KeyValue`] as stored in the `Kv` keyspace.
//!
//! Layout (format 1):
//!
//! ```text
//! [format: u8 = 1]
//! [key length: varint] [key bytes]
//! [create_revision: zigzag varint] [mod_revision: zigzag varint]
//! [version: zigzag varint] [lease: zigzag varint]
//! [value bytes: the rest of the record]
//! ```
//!
//! The value goes last and unprefixed so that the common case (a small key, large value)
//! costs a handful of header bytes, and so that a keys-only read can stop before copying
//! it. The leading format byte lets a later layout coexist with this one on disk.

use super::{Error, KeyValue, Result};

/// The format byte written by [`encode`].
const FORMAT_V1: u8 = 1;

/// Encodes `kv` into its storage record.
pub(super) fn encode(kv: &KeyValue) -> Vec<u8> {
    // 1 format byte, up to 10 bytes per varint (5 of them), then the two byte strings.
    let mut out = Vec::with_capacity(1 + 5 * 10 + kv.key.len() + kv.value.len());
    out.push(FORMAT_V1);
    put_varint(&mut out, kv.key.len() as u64);
    out.extend_from_slice(&kv.key);
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        put_varint(&mut out, zigzag(n));
    }
    out.extend_from_slice(&kv.value);
    out
}

/// Decodes a storage record; with `with_value` false the value is left empty (keys-only
/// reads skip the copy).
///
/// # Errors
/// Returns [`Error::Corrupt`] on an unknown format byte or a truncated record.
pub(super) fn decode(bytes: &[u8], with_value: bool) -> Result<KeyValue> {
    let mut r = Reader { bytes };
    let format = r.byte()?;
    if format != FORMAT_V1 {
        return Err(corrupt(&format!("unknown key-value format {format}")));
    }
    let key_len = usize::try_from(r.varint()?).map_err(|_| corrupt("key length overflows"))?;
    let key = r.take(key_len)?.to_vec();
    let create_revision = unzigzag(r.varint()?);
    let mod_revision = unzigzag(r.varint()?);
    let version = unzigzag(r.varint()?);
    let lease = unzigzag(r.varint()?);
    let value = if with_value { r.bytes.to_vec() } else { Vec::new() };
    Ok(KeyValue { key, create_revision, mod_revision, version, value, lease })
}

fn corrupt(what: &str) -> Error {
    Error::Corrupt(format!("key-value record: {what}"))
}

/// Maps signed to unsigned so small negative numbers stay short (protobuf's sint64).
fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Appends `n` as a LEB128 varint (7 bits per byte, low bits first).
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A cursor over a record that fails instead of panicking when the record is short.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8> {
        let (&b, rest) = self.bytes.split_first().ok_or_else(|| corrupt("truncated"))?;
        self.bytes = rest;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let (head, rest) = self.bytes.split_at_checked(n).ok_or_else(|| corrupt("truncated"))?;
        self.bytes = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut n = 0u64;
        // A u64 needs at most 10 groups of 7 bits; an 11th continuation byte is corrupt.
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(corrupt("varint too long"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_round_trip_including_extreme_fields() {
        let cases = [
            KeyValue::default(),
            KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 7,
                version: 3,
                value: b"bar".to_vec(),
                lease: 0x1234_5678_9abc,
            },
            KeyValue {
                key: vec![0xff; 300],
                create_revision: i64::MAX,
                mod_revision: i64::MIN,
                version: -1,
                value: vec![0; 70_000],
                lease: -7,
            },
        ];
        for kv in cases {
            let bytes = encode(&kv);
            assert_eq!(decode(&bytes, true).unwrap(), kv);
            let keys_only = decode(&bytes, false).unwrap();
            assert_eq!(keys_only, KeyValue { value: Vec::new(), ..kv });
        }
    }

    #[test]
    fn truncated_or_foreign_records_are_corrupt() {
        let kv = KeyValue { key: b"k".to_vec(), mod_revision: 300, ..Default::default() };
        let bytes = encode(&kv);
        // Every strict prefix that cuts the header must fail (the value may be empty).
        for len in 0..bytes.len() {
            assert!(matches!(decode(&bytes[..len], true), Err(Error::Corrupt(_))), "{len}");
        }
        let mut foreign = bytes.clone();
        foreign[0] = 9;
        assert!(matches!(decode(&foreign, true), Err(Error::Corrupt(_))));
        let endless = [FORMAT_V1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1];
        assert!(matches!(decode(&endless, true), Err(Error::Corrupt(_))));
    }
}
