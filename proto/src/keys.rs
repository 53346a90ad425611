//! Chunk keys: the token-prefix hash chain, compatible with vLLM's block hashing
//! (`sha256_cbor`), so prefixd keys equal the block hashes vLLM computes for the same tokens.
//!
//! ```text
//! h_{-1} = NONE_HASH = SHA-256(CBOR(seed))                       (seed: a text string)
//! h_i    = SHA-256(CBOR([h_{i-1}, [token ids of block i], null]))   (canonical CBOR)
//! ```
//! A chunk of `chunk_tokens` tokens is keyed by the hash of its last `block_tokens` block. Only
//! full chunks get keys: a trailing partial chunk is never cached. With vLLM, run it with
//! `PYTHONHASHSEED` set to the seed used here (vLLM draws a random seed otherwise, and two
//! processes then never agree on a single key).

use sha2::{Digest, Sha256};
use std::fmt;

/// Length of a chunk key in bytes.
pub const KEY_LEN: usize = 32;

/// A 32-byte chunk key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; KEY_LEN]);

impl ChunkKey {
    pub fn from_slice(b: &[u8]) -> Option<ChunkKey> {
        b.try_into().ok().map(ChunkKey)
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How keys are made. Producers and consumers must agree on all three.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    /// Seed of the chain (vLLM: the value of `PYTHONHASHSEED`). Default "0".
    pub seed: String,
    /// Tokens per block (vLLM's `block_size`). Default 16.
    pub block_tokens: usize,
    /// Tokens per chunk; a multiple of `block_tokens`. Default 256.
    pub chunk_tokens: usize,
}

impl Default for KeyConfig {
    fn default() -> Self {
        KeyConfig { seed: "0".into(), block_tokens: 16, chunk_tokens: 256 }
    }
}

impl KeyConfig {
    /// Checks that the sizes are usable: both positive, chunk a multiple of block.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_tokens == 0 || self.chunk_tokens == 0 {
            return Err("block_tokens and chunk_tokens must be positive".into());
        }
        if self.chunk_tokens % self.block_tokens != 0 {
            return Err(format!(
                "chunk_tokens ({}) must be a multiple of block_tokens ({})",
                self.chunk_tokens, self.block_tokens
            ));
        }
        Ok(())
    }

    /// `NONE_HASH`: the parent of the first block.
    pub fn none_hash(&self) -> [u8; KEY_LEN] {
        let mut cbor = Vec::with_capacity(self.seed.len() + 9);
        cbor_head(&mut cbor, 3, self.seed.len() as u64);
        cbor.extend_from_slice(self.seed.as_bytes());
        Sha256::digest(&cbor).into()
    }

    /// The hash of every full block of `tokens`, in order (vLLM's block hashes).
    pub fn block_hashes(&self, tokens: &[u32]) -> Vec<[u8; KEY_LEN]> {
        let mut parent = self.none_hash();
        let mut out = Vec::with_capacity(tokens.len() / self.block_tokens.max(1));
        let mut cbor = Vec::with_capacity(64 + self.block_tokens * 5);
        for block in tokens.chunks_exact(self.block_tokens.max(1)) {
            cbor.clear();
            cbor_head(&mut cbor, 4, 3); // [parent, tokens, extra_keys]
            cbor_head(&mut cbor, 2, KEY_LEN as u64);
            cbor.extend_from_slice(&parent);
            cbor_head(&mut cbor, 4, block.len() as u64);
            for &t in block {
                cbor_head(&mut cbor, 0, t as u64);
            }
            cbor.push(0xf6); // null: no extra keys
            parent = Sha256::digest(&cbor).into();
            out.push(parent);
        }
        out
    }

    /// One key per full chunk of `tokens`: the hash of the chunk's last block.
    pub fn chunk_keys(&self, tokens: &[u32]) -> Vec<ChunkKey> {
        let per_chunk = (self.chunk_tokens / self.block_tokens.max(1)).max(1);
        let full_chunks = tokens.len() / self.chunk_tokens.max(1);
        let blocks = self.block_hashes(&tokens[..full_chunks * self.chunk_tokens]);
        blocks.chunks_exact(per_chunk).filter_map(|c| c.last().copied().map(ChunkKey)).collect()
    }
}

/// Writes a canonical (shortest-form) CBOR head: major type and argument.
fn cbor_head(out: &mut Vec<u8>, major: u8, value: u64) {
    let m = major << 5;
    if value < 24 {
        out.push(m | value as u8);
    } else if value <= u8::MAX as u64 {
        out.extend_from_slice(&[m | 24, value as u8]);
    } else if value <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(value as u16).to_be_bytes());
    } else if value <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(value as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Parses a tokens file: integer ids separated by whitespace or commas, or a JSON array of them.
pub fn parse_tokens(text: &str) -> Result<Vec<u32>, String> {
    let trimmed = text.trim();
    let body = match trimmed.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or("a JSON array must end with ']'")?,
        None => trimmed,
    };
    body.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| s.parse::<u32>().map_err(|e| format!("token #{i} {s:?} is not a token id: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Vectors written by testdata/make_key_vectors.py (Python hashlib + cbor2).
    #[test]
    fn matches_python_vectors() {
        let text = include_str!("../testdata/key_vectors.txt");
        let mut cases = 0;
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(f.len(), 6, "bad vector line {line:?}");
            let cfg = KeyConfig {
                seed: f[0].to_owned(),
                block_tokens: f[1].parse().unwrap(),
                chunk_tokens: f[2].parse().unwrap(),
            };
            let tokens = parse_tokens(f[3]).unwrap();
            assert_eq!(
                cfg.none_hash().to_vec(),
                hex(f[4].split(',').next().unwrap()),
                "NONE_HASH, seed {:?}",
                cfg.seed
            );
            let want: Vec<Vec<u8>> = f[5].split(',').filter(|s| !s.is_empty()).map(hex).collect();
            let got: Vec<Vec<u8>> = cfg.chunk_keys(&tokens).iter().map(|k| k.0.to_vec()).collect();
            assert_eq!(got, want, "chunk keys for seed {:?}, {} tokens", cfg.seed, tokens.len());
            cases += 1;
        }
        assert!(cases >= 5, "only {cases} vectors");
    }

    #[test]
    fn shared_prefix_shares_keys() {
        let cfg = KeyConfig::default();
        let a: Vec<u32> = (0..1000).collect();
        let mut b = a[..512].to_vec();
        b.extend(5000..5600);
        let (ka, kb) = (cfg.chunk_keys(&a), cfg.chunk_keys(&b));
        assert_eq!(ka.len(), 3);
        assert_eq!(kb.len(), 4);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
    }

    #[test]
    fn parses_token_files() {
        assert_eq!(parse_tokens("1 2,3\n4").unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(parse_tokens("[1, 2, 3]").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_tokens("").unwrap(), Vec::<u32>::new());
        assert!(parse_tokens("1 x 3").unwrap_err().contains("\"x\""));
        assert!(parse_tokens("[1, 2").is_err());
        assert!(parse_tokens("-1").is_err());
    }

    #[test]
    fn validates_sizes() {
        assert!(KeyConfig { chunk_tokens: 250, ..KeyConfig::default() }.validate().is_err());
        assert!(KeyConfig { block_tokens: 0, ..KeyConfig::default() }.validate().is_err());
        assert!(KeyConfig::default().validate().is_ok());
    }
}
