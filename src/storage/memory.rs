//! An in-memory [`Engine`] for unit tests, benches and simulation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use super::{
    Batch, Engine, Error, Keyspace, Result, Rewrite, Scan, image_pairs, image_push, image_seal,
};

/// An [`Engine`] that keeps everything in a `BTreeMap`; `sync` is a no-op.
#[derive(Debug, Default)]
pub struct MemEngine {
    map: RwLock<BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemEngine {
    /// Creates an empty engine.
    pub fn new() -> Self {
        Self::default()
    }
}

fn poisoned<T>(_: T) -> Error {
    Error::Engine("memory engine lock poisoned".to_owned())
}

impl Engine for MemEngine {
    fn get(&self, keyspace: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let map = self.map.read().map_err(poisoned)?;
        Ok(map.get(&keyspace.encode(key)).cloned())
    }

    fn scan(
        &self,
        keyspace: Keyspace,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Scan,
    ) -> Result<()> {
        let map = self.map.read().map_err(poisoned)?;
        let (lo, hi) = keyspace.scan_bounds(start, end);
        for (k, v) in map.range((Bound::Included(lo), Bound::Excluded(hi))) {
            if visit(k.get(1..).unwrap_or_default(), v) == Scan::Stop {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: Batch) -> Result<()> {
        let mut map = self.map.write().map_err(poisoned)?;
        for op in batch.into_ops() {
            let key = op.keyspace.encode(&op.key);
            match op.value {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }

    fn export(&self) -> Result<Vec<u8>> {
        let map = self.map.read().map_err(poisoned)?;
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            image_push(&mut out, k, v);
        }
        Ok(image_seal(out))
    }

    fn rewrite(&self) -> Result<Box<dyn Rewrite + '_>> {
        Ok(Box::new(MemRewrite { engine: self, fresh: MemEngine::new() }))
    }

    fn import(&self, image: &[u8]) -> Result<()> {
        let pairs = image_pairs(image)?;
        let mut map = self.map.write().map_err(poisoned)?;
        *map = pairs.into_iter().collect();
        Ok(())
    }
}

/// A rewrite into a fresh map, swapped in at commit.
struct MemRewrite<'a> {
    engine: &'a MemEngine,
    fresh: MemEngine,
}

impl Rewrite for MemRewrite<'_> {
    fn write(&mut self, batch: Batch) -> Result<()> {
        self.fresh.write(batch)
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let fresh = self.fresh.map.into_inner().map_err(poisoned)?;
        *self.engine.map.write().map_err(poisoned)? = fresh;
        Ok(())
    }
}
