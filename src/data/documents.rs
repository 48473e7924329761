//! Reading documents from text corpora: plain text, JSON lines with a `text` field, and JSON
//! arrays of objects with a `story` (TinyStories shards) or `text` field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The delimiter TinyStories and GPT-2 style corpora put between documents.
pub const DOC_SEPARATOR: &str = "<|endoftext|>";

/// How a plain-text file is cut into documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSplit {
    /// On `<|endoftext|>` when the file contains it, else the whole file is one document.
    Auto,
    /// On a given delimiter string.
    On(String),
    /// Every non-empty line is a document.
    Lines,
    /// The whole file is one document.
    File,
}

impl TextSplit {
    /// Parses `auto`, `lines`, `file` or any other string as a delimiter.
    pub fn parse(s: &str) -> Self {
        match s {
            "auto" => TextSplit::Auto,
            "lines" => TextSplit::Lines,
            "file" => TextSplit::File,
            other => TextSplit::On(other.to_string()),
        }
    }
}

/// The input files of a list of paths: files as given, folders expanded to their `.txt`,
/// `.json` and `.jsonl` files (sorted).
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io("listing", p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension()
                            .and_then(|x| x.to_str())
                            .is_some_and(|x| matches!(x, "txt" | "json" | "jsonl"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::data(
                    p,
                    "the folder holds no .txt, .json or .jsonl files",
                ));
            }
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(Error::data(p, "no such file or folder"));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("no input files given"));
    }
    Ok(out)
}

fn field_text(v: &Value) -> Option<String> {
    ["text", "story", "content"]
        .iter()
        .find_map(|k| v.get(k).and_then(|t| t.as_str()).map(str::to_string))
}

/// The documents of one file's contents. `path` decides the format by extension (`.jsonl`,
/// `.json`, anything else is text) and names the file in errors.
pub fn documents_of(path: &Path, content: &str, split: &TextSplit) -> Result<Vec<String>> {
    let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
    let docs: Vec<String> = match ext {
        "jsonl" => {
            let mut v = Vec::new();
            for (i, line) in content.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let obj: Value = serde_json::from_str(line)
                    .map_err(|e| Error::data(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
                let text = field_text(&obj).ok_or_else(|| {
                    Error::data(path, format!("line {}: no \"text\" field", i + 1))
                })?;
                v.push(text);
            }
            v
        }
        "json" => {
            let root: Value = serde_json::from_str(content)
                .map_err(|e| Error::data(path, format!("invalid JSON: {e}")))?;
            let items = root.as_array().ok_or_else(|| {
                Error::data(
                    path,
                    "expected a JSON array of objects with a \"story\" or \"text\" field",
                )
            })?;
            let mut v = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let text = field_text(item).ok_or_else(|| {
                    Error::data(path, format!("item {i} has no \"story\" or \"text\" field"))
                })?;
                v.push(text);
            }
            v
        }
        _ => match split {
            TextSplit::Auto if content.contains(DOC_SEPARATOR) => {
                content.split(DOC_SEPARATOR).map(str::to_string).collect()
            }
            TextSplit::On(sep) => content.split(sep.as_str()).map(str::to_string).collect(),
            TextSplit::Lines => content.lines().map(str::to_string).collect(),
            TextSplit::Auto | TextSplit::File => vec![content.to_string()],
        },
    };
    Ok(docs
        .into_iter()
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect())
}

/// Reads a file and returns its documents.
pub fn read_documents(path: &Path, split: &TextSplit) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let content = String::from_utf8(bytes).map_err(|e| {
        Error::data(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    documents_of(path, &content, split)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_splits() {
        let p = Path::new("a.txt");
        assert_eq!(
            documents_of(p, "a\n<|endoftext|>\n b ", &TextSplit::Auto).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            documents_of(p, "one\n\ntwo", &TextSplit::Auto).unwrap(),
            vec!["one\n\ntwo"]
        );
        assert_eq!(
            documents_of(p, "x\ny\n", &TextSplit::Lines).unwrap(),
            vec!["x", "y"]
        );
        let j = Path::new("a.jsonl");
        assert_eq!(
            documents_of(
                j,
                "{\"text\":\"hi\"}\n\n{\"text\":\"yo\"}",
                &TextSplit::Auto
            )
            .unwrap(),
            vec!["hi", "yo"]
        );
        assert!(
            documents_of(j, "{\"nope\":1}", &TextSplit::Auto)
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        let s = Path::new("data00.json");
        let docs = documents_of(
            s,
            r#"[{"story":"Once.","instruction":{}},{"story":"Twice."}]"#,
            &TextSplit::Auto,
        )
        .unwrap();
        assert_eq!(docs, vec!["Once.", "Twice."]);
        assert!(documents_of(s, "{}", &TextSplit::Auto).is_err());
    }
}
