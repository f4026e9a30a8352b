//! Parquet shards in the HuggingFace OpenWebMath layout (`url`, `text`, `date`, `metadata`),
//! read one column chunk at a time: only the text column is decoded, a bounded number of rows at
//! a time, so memory stays flat whatever the shard size.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::{Compression, ZstdLevel};
use parquet::column::reader::{get_typed_column_reader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::{bytes_event, Event, SkipReason};

/// Rows decoded per read.
const ROWS_PER_READ: usize = 256;

/// The documents of a parquet shard, row group by row group.
pub struct ParquetDocs {
    reader: SerializedFileReader<File>,
    column: usize,
    max_def: i16,
    row_group: usize,
    /// First row of the current row group.
    group_first_row: u64,
    /// Rows of the current row group already consumed.
    group_rows_done: u64,
    group_rows: u64,
    column_reader: Option<ColumnReaderImpl<ByteArrayType>>,
    pending: std::collections::VecDeque<Event>,
    defs: Vec<i16>,
    values: Vec<ByteArray>,
}

impl ParquetDocs {
    /// Opens a shard; row groups are read as the iterator is pulled.
    pub fn open(path: &Path, text_field: &str) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| format!("not a readable parquet file: {e}"))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let column = (0..schema.num_columns())
            .find(|&i| schema.column(i).path().string() == text_field)
            .ok_or_else(|| {
                let names: Vec<String> = (0..schema.num_columns())
                    .map(|i| schema.column(i).path().string())
                    .collect();
                format!("no column `{text_field}` (columns: {})", names.join(", "))
            })?;
        let descr = schema.column(column);
        if descr.physical_type() != parquet::basic::Type::BYTE_ARRAY {
            return Err(format!(
                "column `{text_field}` holds {:?}, not strings",
                descr.physical_type()
            ));
        }
        if descr.max_rep_level() > 0 {
            return Err(format!(
                "column `{text_field}` is repeated, not one string per row"
            ));
        }
        Ok(ParquetDocs {
            max_def: descr.max_def_level(),
            reader,
            column,
            row_group: 0,
            group_first_row: 0,
            group_rows_done: 0,
            group_rows: 0,
            column_reader: None,
            pending: Default::default(),
            defs: Vec::with_capacity(ROWS_PER_READ),
            values: Vec::with_capacity(ROWS_PER_READ),
        })
    }

    /// Opens the next row group's text column; false when there is none.
    fn next_group(&mut self) -> bool {
        loop {
            self.group_first_row += self.group_rows;
            self.group_rows_done = 0;
            let i = self.row_group;
            if i >= self.reader.num_row_groups() {
                return false;
            }
            self.row_group += 1;
            self.group_rows = self.reader.metadata().row_group(i).num_rows().max(0) as u64;
            let opened = self
                .reader
                .get_row_group(i)
                .and_then(|g| g.get_column_reader(self.column));
            match opened {
                Ok(r) => {
                    self.column_reader = Some(get_typed_column_reader::<ByteArrayType>(r));
                    return true;
                }
                Err(e) => self.pending.push_back(Event::Damage {
                    row: Some(self.group_first_row),
                    reason: format!(
                        "row group {i} unreadable, {} rows lost: {e}",
                        self.group_rows
                    ),
                }),
            }
        }
    }

    fn read_some(&mut self) {
        let Some(reader) = self.column_reader.as_mut() else {
            return;
        };
        self.defs.clear();
        self.values.clear();
        let defs = (self.max_def > 0).then_some(&mut self.defs);
        match reader.read_records(ROWS_PER_READ, defs, None, &mut self.values) {
            Ok((0, _, _)) => {
                if self.group_rows_done < self.group_rows {
                    self.pending.push_back(Event::Damage {
                        row: Some(self.group_first_row + self.group_rows_done),
                        reason: format!(
                            "row group {} ends early, {} rows lost",
                            self.row_group - 1,
                            self.group_rows - self.group_rows_done
                        ),
                    });
                }
                self.column_reader = None;
            }
            Ok((records, _, _)) => {
                let mut values = std::mem::take(&mut self.values).into_iter();
                for i in 0..records {
                    let row = self.group_first_row + self.group_rows_done + i as u64;
                    let present = self.max_def == 0 || self.defs.get(i) == Some(&self.max_def);
                    let event = match (present, present.then(|| values.next()).flatten()) {
                        (true, Some(v)) => bytes_event(row, v.data().to_vec()),
                        _ => Event::Skip {
                            row,
                            reason: SkipReason::NoText,
                        },
                    };
                    self.pending.push_back(event);
                }
                self.group_rows_done += records as u64;
            }
            Err(e) => {
                let row = self.group_first_row + self.group_rows_done;
                self.pending.push_back(Event::Damage {
                    row: Some(row),
                    reason: format!(
                        "corrupt data in row group {}, {} rows lost: {e}",
                        self.row_group - 1,
                        self.group_rows - self.group_rows_done
                    ),
                });
                self.column_reader = None;
            }
        }
    }
}

impl Iterator for ParquetDocs {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.column_reader.is_none() && !self.next_group() {
                return self.pending.pop_front();
            }
            self.read_some();
        }
    }
}

/// One row of an OpenWebMath-style shard.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Where the document was found.
    pub url: String,
    /// `None` writes a null, as a row without text.
    pub text: Option<String>,
    /// When it was crawled.
    pub date: String,
    /// A JSON document, as OpenWebMath stores it.
    pub metadata: String,
}

/// Writes rows as a zstd-compressed parquet shard with the OpenWebMath schema, `rows_per_group`
/// rows per row group.
pub fn write_shard(path: &Path, rows: &[Row], rows_per_group: usize) -> std::io::Result<()> {
    write_rows(path, rows, None, rows_per_group)
}

/// Per-document token columns: the ids of the document's tokens and, for each, a mask value.
#[derive(Debug, Clone, Default)]
pub struct TokenColumns {
    /// The document's token ids.
    pub token_ids: Vec<u32>,
    /// One value per token (1: selected).
    pub mask: Vec<u8>,
}

/// Writes rows with two more columns, `token_ids` (list of uint32) and `mask` (list of uint8),
/// one entry per token of the row's document.
pub fn write_shard_with_tokens(
    path: &Path,
    rows: &[Row],
    tokens: &[TokenColumns],
    rows_per_group: usize,
) -> std::io::Result<()> {
    if rows.len() != tokens.len() {
        return Err(std::io::Error::other("one TokenColumns per row"));
    }
    write_rows(path, rows, Some(tokens), rows_per_group)
}

fn write_rows(
    path: &Path,
    rows: &[Row],
    tokens: Option<&[TokenColumns]>,
    rows_per_group: usize,
) -> std::io::Result<()> {
    let extra = if tokens.is_some() {
        "REQUIRED group token_ids (LIST) { REPEATED group list { REQUIRED INT32 element (UINT_32); } }
         REQUIRED group mask (LIST) { REPEATED group list { REQUIRED INT32 element (UINT_8); } }"
    } else {
        ""
    };
    let schema = parse_message_type(&format!(
        "message schema {{
            OPTIONAL BYTE_ARRAY url (UTF8);
            OPTIONAL BYTE_ARRAY text (UTF8);
            OPTIONAL BYTE_ARRAY date (UTF8);
            OPTIONAL BYTE_ARRAY metadata (UTF8);
            {extra}
        }}"
    ))
    .map_err(std::io::Error::other)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let file = File::create(path)?;
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))
        .map_err(std::io::Error::other)?;
    let step = rows_per_group.max(1);
    for (g, group) in rows.chunks(step).enumerate() {
        let mut rg = writer.next_row_group().map_err(std::io::Error::other)?;
        let columns: [Vec<Option<&str>>; 4] = [
            group.iter().map(|r| Some(r.url.as_str())).collect(),
            group.iter().map(|r| r.text.as_deref()).collect(),
            group.iter().map(|r| Some(r.date.as_str())).collect(),
            group.iter().map(|r| Some(r.metadata.as_str())).collect(),
        ];
        for column in columns {
            let mut col = rg
                .next_column()
                .map_err(std::io::Error::other)?
                .ok_or_else(|| std::io::Error::other("schema has fewer columns"))?;
            let defs: Vec<i16> = column.iter().map(|v| i16::from(v.is_some())).collect();
            let values: Vec<ByteArray> = column
                .iter()
                .flatten()
                .map(|s| ByteArray::from(s.as_bytes().to_vec()))
                .collect();
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .map_err(std::io::Error::other)?;
            col.close().map_err(std::io::Error::other)?;
        }
        if let Some(tokens) = tokens {
            let group_tokens = &tokens[g * step..g * step + group.len()];
            let lists: [Vec<Vec<i32>>; 2] = [
                group_tokens
                    .iter()
                    .map(|t| t.token_ids.iter().map(|&x| x as i32).collect())
                    .collect(),
                group_tokens
                    .iter()
                    .map(|t| t.mask.iter().map(|&x| i32::from(x)).collect())
                    .collect(),
            ];
            for list in lists {
                let mut col = rg
                    .next_column()
                    .map_err(std::io::Error::other)?
                    .ok_or_else(|| std::io::Error::other("schema has fewer columns"))?;
                // A required list of required values: an empty list is one level pair (0, 0)
                // with no value; a value is defined at level 1, repeated (1) after the first.
                let (mut values, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
                for row in &list {
                    if row.is_empty() {
                        defs.push(0);
                        reps.push(0);
                    }
                    for (i, &v) in row.iter().enumerate() {
                        values.push(v);
                        defs.push(1);
                        reps.push(i16::from(i > 0));
                    }
                }
                col.typed::<Int32Type>()
                    .write_batch(&values, Some(&defs), Some(&reps))
                    .map_err(std::io::Error::other)?;
                col.close().map_err(std::io::Error::other)?;
            }
        }
        rg.close().map_err(std::io::Error::other)?;
    }
    writer.close().map_err(std::io::Error::other)?;
    Ok(())
}

#[cfg(test)]
mod token_column_tests {
    use super::*;
    use parquet::record::{ListAccessor, RowAccessor};

    #[test]
    fn token_columns_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.parquet");
        let row = |t: &str| Row {
            url: "u".into(),
            text: Some(t.into()),
            date: "d".into(),
            metadata: "{}".into(),
        };
        let rows = [row("a"), row(""), row("b")];
        let tokens = [
            TokenColumns {
                token_ids: vec![5, 4_000_000_000, 7],
                mask: vec![0, 1, 1],
            },
            TokenColumns::default(),
            TokenColumns {
                token_ids: vec![9],
                mask: vec![1],
            },
        ];
        write_shard_with_tokens(&path, &rows, &tokens, 2).unwrap();
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let got: Vec<(Vec<u32>, Vec<u8>)> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                let ids = r.get_list(4).unwrap();
                let mask = r.get_list(5).unwrap();
                (
                    (0..ids.len()).map(|i| ids.get_uint(i).unwrap()).collect(),
                    (0..mask.len())
                        .map(|i| mask.get_ubyte(i).unwrap())
                        .collect(),
                )
            })
            .collect();
        let expected: Vec<(Vec<u32>, Vec<u8>)> = tokens
            .iter()
            .map(|t| (t.token_ids.clone(), t.mask.clone()))
            .collect();
        assert_eq!(got, expected);
        // The text column still reads as a shard of documents.
        let docs: Vec<Event> = ParquetDocs::open(&path, "text").unwrap().collect();
        assert_eq!(docs.len(), 3);
    }
}
