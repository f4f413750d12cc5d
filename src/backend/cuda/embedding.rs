//! Host side of the embedding kernels (`kernels/embedding.cu`): the field-group descriptor
//! passed by value to every launch, and the sizes of the backward's counting sort.

use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::backend::{EmbMode, EmbTable};

/// Fields per launch (`EMB_MAX_FIELDS` in embedding.cu).
pub const EMB_MAX_FIELDS: usize = 32;
/// Items (token × field) per chunk of the backward's counting sort, at least (one warp
/// places a chunk's items, 32 at a time, in order).
pub const EMB_CHUNK: usize = 1024;
/// Largest chunk × key histogram of the backward, in entries (64 MiB of `u32`); beyond it the
/// chunks grow.
pub const EMB_HIST_MAX: usize = 1 << 24;
/// Threads of the one-block key scan (`EMB_SCAN_THREADS` in embedding.cu).
pub const EMB_SCAN_THREADS: u32 = 1024;

/// A group of embedding fields handled by one launch, laid out as `EmbFields` in
/// embedding.cu: field `f` of the group is field `first + f` of the ids, its rows are keys
/// `key0[f] .. key0[f + 1]` of the group's key space, its table starts at element
/// `offset[f]`, and its slice of the output row at column `col0[f]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EmbFields {
    /// Fields in the group.
    pub count: i32,
    /// The group's first field among the ids' columns.
    pub first: i32,
    /// First key of each field; `key0[count]` is the number of keys.
    pub key0: [u32; EMB_MAX_FIELDS + 1],
    /// Element offset of each field's table.
    pub offset: [i64; EMB_MAX_FIELDS],
    /// First output column of each field.
    pub col0: [i32; EMB_MAX_FIELDS],
}

impl EmbFields {
    /// Number of keys of the group's key space (rows of all its tables), `key0[count]`.
    pub fn keys(&self) -> u32 {
        self.key0[self.count as usize]
    }
}

// Same size as the C struct: 2 ints, 33 u32, 4 bytes of padding, 32 i64, 32 ints.
const _: () = assert!(std::mem::size_of::<EmbFields>() == 8 + 4 * 33 + 4 + 8 * 32 + 4 * 32);

// SAFETY: plain-old-data with the C layout of `EmbFields` in kernels/embedding.cu (repr(C),
// no pointers), passed by value as a kernel parameter.
unsafe impl DeviceRepr for EmbFields {}

impl EmbFields {
    /// The launch groups of `tables` for rows of `width` in `mode`: runs of at most
    /// [`EMB_MAX_FIELDS`] fields in field order, or — when `serial_if_shared` and two tables
    /// share parameter elements — one field per group, so that a gradient element shared by
    /// two fields receives its terms field after field, as on the CPU.
    pub fn groups(
        tables: &[EmbTable],
        width: usize,
        mode: EmbMode,
        serial_if_shared: bool,
    ) -> Vec<EmbFields> {
        let per = if serial_if_shared && tables_overlap(tables, width) {
            1
        } else {
            EMB_MAX_FIELDS
        };
        let mut groups = Vec::new();
        for (gi, run) in tables.chunks(per).enumerate() {
            let first = gi * per;
            let mut g = EmbFields {
                count: run.len() as i32,
                first: i32::try_from(first).expect("field index within i32"),
                key0: [0; EMB_MAX_FIELDS + 1],
                offset: [0; EMB_MAX_FIELDS],
                col0: [0; EMB_MAX_FIELDS],
            };
            let mut key = 0u32;
            for (f, t) in run.iter().enumerate() {
                g.key0[f] = key;
                key = u32::try_from(t.vocab)
                    .ok()
                    .and_then(|v| key.checked_add(v))
                    .expect("a field group's vocabularies add up to less than 2^32");
                g.offset[f] = i64::try_from(t.offset).expect("table offset within i64");
                g.col0[f] = match mode {
                    EmbMode::Sum => 0,
                    EmbMode::Concat => {
                        i32::try_from((first + f) * width).expect("column within i32")
                    }
                };
            }
            g.key0[run.len()] = key;
            groups.push(g);
        }
        groups
    }
}

/// The launches of the embedding backward for one field group (`kernels/embedding.cu`,
/// passes 1–5), public so that the kernel lab launches exactly what the backend does.
#[derive(Debug, Clone, Copy)]
pub struct EmbBackwardPlan {
    /// Items (token × field) per chunk of the counting sort.
    pub chunk: usize,
    /// Chunks of the counting sort.
    pub chunks: usize,
    /// Keys of the group (rows of all its tables).
    pub keys: usize,
    /// `u32` scratch: the chunk × key histogram, the `keys + 1` starts, the sorted items.
    pub scratch: usize,
    /// Pass 1 (`emb_hist`): a block per chunk.
    pub hist: LaunchConfig,
    /// Pass 2 (`emb_col_scan`): a thread per key.
    pub col_scan: LaunchConfig,
    /// Pass 3 (`emb_key_scan`): one block.
    pub key_scan: LaunchConfig,
    /// Pass 4 (`emb_place`): a warp per chunk.
    pub place: LaunchConfig,
    /// Pass 5 (`emb_rows_*`): a block per key and column tile.
    pub rows: LaunchConfig,
}

impl EmbBackwardPlan {
    /// The plan for `group` over `n` tokens with rows of `width`.
    pub fn new(group: &EmbFields, n: usize, width: usize) -> EmbBackwardPlan {
        let keys = group.keys() as usize;
        let items = n * group.count as usize;
        let chunk = EMB_CHUNK.max((items * keys).div_ceil(EMB_HIST_MAX));
        let chunks = items.div_ceil(chunk);
        let per_chunk = |threads: u32| LaunchConfig {
            grid_dim: (u32::try_from(chunks).expect("chunks within the grid"), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let tx = width.next_multiple_of(32).min(128);
        EmbBackwardPlan {
            chunk,
            chunks,
            keys,
            scratch: chunks * keys + keys + 1 + items,
            hist: per_chunk(super::THREADS),
            col_scan: super::grid1(keys),
            key_scan: LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (EMB_SCAN_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            place: per_chunk(32),
            rows: LaunchConfig {
                grid_dim: (group.keys(), width.div_ceil(tx) as u32, 1),
                block_dim: (tx as u32, 1, 1),
                shared_mem_bytes: 0,
            },
        }
    }
}

/// Whether two of `tables` (rows of `width`) share a parameter element.
fn tables_overlap(tables: &[EmbTable], width: usize) -> bool {
    let mut spans: Vec<(usize, usize)> = tables
        .iter()
        .filter(|t| t.vocab > 0 && width > 0)
        .map(|t| (t.offset, t.offset + t.vocab * width))
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|p| p[0].1 > p[1].0)
}

/// Panics (a caller bug, as on the CPU backend) when a table runs past a buffer of `len`.
pub fn check_tables(what: &str, tables: &[EmbTable], width: usize, len: usize) {
    for (k, t) in tables.iter().enumerate() {
        assert!(
            t.offset + t.vocab * width <= len,
            "{what}: table {k} at {} exceeds the buffer of {len}",
            t.offset
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(offset: usize, vocab: usize) -> EmbTable {
        EmbTable { offset, vocab }
    }

    #[test]
    fn groups_lay_out_keys_offsets_and_columns() {
        let tables = [t(0, 3), t(12, 5), t(40, 2)];
        let g = EmbFields::groups(&tables, 4, EmbMode::Concat, true);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].count, 3);
        assert_eq!(&g[0].key0[..4], &[0, 3, 8, 10]);
        assert_eq!(&g[0].offset[..3], &[0, 12, 40]);
        assert_eq!(&g[0].col0[..3], &[0, 4, 8]);
        let s = EmbFields::groups(&tables, 4, EmbMode::Sum, true);
        assert_eq!(&s[0].col0[..3], &[0, 0, 0]);
    }

    #[test]
    fn shared_tables_go_one_field_at_a_time_in_the_backward() {
        // Field 1 reads rows of field 0's table.
        let tables = [t(0, 4), t(8, 2), t(16, 1)];
        let g = EmbFields::groups(&tables, 4, EmbMode::Concat, true);
        assert_eq!(g.len(), 3);
        assert_eq!((g[1].first, g[1].count, g[1].col0[0]), (1, 1, 4));
        assert_eq!(&g[2].key0[..2], &[0, 1]);
        // The forward only reads: one group.
        assert_eq!(
            EmbFields::groups(&tables, 4, EmbMode::Concat, false).len(),
            1
        );
    }

    #[test]
    fn more_fields_than_a_launch_takes_are_split_in_order() {
        let tables: Vec<EmbTable> = (0..70).map(|k| t(k * 10, 2)).collect();
        let g = EmbFields::groups(&tables, 5, EmbMode::Concat, true);
        assert_eq!(
            g.iter().map(|g| g.count).collect::<Vec<_>>(),
            vec![32, 32, 6]
        );
        assert_eq!((g[2].first, g[2].col0[0]), (64, 320));
    }
}
