//! The text form of the IR: a printer and a parser that round-trip.
//!
//! ```text
//! graph "llama" {
//!   %0 = input kind=tokens : i32[n]
//!   %1 = weight name="model.embed_tokens.weight" : f32[256, 128]
//!   %2 = embedding(%1, %0) : f32[n, 128]
//!   ...
//!   output logits = %40
//! }
//! ```
//! Nodes are numbered in topological order; lines starting with `;` are comments.

use std::collections::HashMap;
use std::fmt::Write;

use crate::error::IrError;
use crate::graph::{Graph, NodeId};
use crate::op::{Attrs, Op};
use crate::types::{DType, Dim, Shape, Type};

/// Prints a graph in its text form.
pub fn print(g: &Graph) -> String {
    let order = match g.topo_order() {
        Ok(o) => o,
        Err(e) => return format!("; invalid graph: {e}\n"),
    };
    let num: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut s = String::new();
    let _ = writeln!(s, "graph {:?} {{", g.name);
    for &id in &order {
        let node = g.node(id);
        let _ = write!(s, "  %{} = {}", num[&id], node.op.name());
        let ops = g.operands(id);
        if !ops.is_empty() {
            let args: Vec<String> = ops.iter().map(|o| format!("%{}", num[o])).collect();
            let _ = write!(s, "({})", args.join(", "));
        }
        for (k, v) in node.op.attrs() {
            let _ = write!(s, " {k}={v}");
        }
        let _ = writeln!(s, " : {}", node.ty);
    }
    for (name, id) in &g.outputs {
        let _ = writeln!(s, "  output {name} = %{}", num.get(id).copied().unwrap_or(usize::MAX));
    }
    s.push_str("}\n");
    s
}

/// Parses the text form and verifies the result.
pub fn parse(text: &str) -> Result<Graph, IrError> {
    let mut graph: Option<Graph> = None;
    let mut ids: HashMap<String, NodeId> = HashMap::new();
    let mut closed = false;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let err = |msg: String| IrError::Parse { line: lineno, msg };
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        if closed {
            return Err(err("text after the closing `}`".into()));
        }
        let Some(g) = graph.as_mut() else {
            let name = line
                .strip_prefix("graph ")
                .and_then(|r| r.strip_suffix('{'))
                .map(str::trim)
                .and_then(|q| q.strip_prefix('"').and_then(|q| q.strip_suffix('"')))
                .and_then(crate::op::unescape)
                .ok_or_else(|| err(format!("expected `graph \"NAME\" {{`, got `{line}`")))?;
            graph = Some(Graph::new(name));
            continue;
        };
        if line == "}" {
            closed = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("output ") {
            let (name, val) = rest.split_once('=').ok_or_else(|| err("expected `output NAME = %K`".into()))?;
            let id = *ids.get(val.trim()).ok_or_else(|| err(format!("unknown value `{}`", val.trim())))?;
            g.output(name.trim(), id);
            continue;
        }
        let (lhs, rhs) = line.split_once(" = ").ok_or_else(|| err(format!("expected `%K = op ...`, got `{line}`")))?;
        let lhs = lhs.trim();
        if !lhs.starts_with('%') || ids.contains_key(lhs) {
            return Err(err(format!("bad or duplicate value name `{lhs}`")));
        }
        let (body, ty) = rhs.rsplit_once(" : ").ok_or_else(|| err("missing ` : TYPE`".into()))?;
        let ty = parse_type(ty.trim()).map_err(err)?;
        let name_end = body.find(['(', ' ']).unwrap_or(body.len());
        let op_name = &body[..name_end];
        let mut rest = &body[name_end..];
        let mut operands = Vec::new();
        if let Some(r) = rest.strip_prefix('(') {
            let close = r.find(')').ok_or_else(|| err("unclosed `(`".into()))?;
            for a in r[..close].split(',') {
                let a = a.trim();
                operands.push(*ids.get(a).ok_or_else(|| err(format!("unknown value `{a}`")))?);
            }
            rest = &r[close + 1..];
        }
        let attrs = parse_attrs(rest).map_err(err)?;
        let op = Op::from_parts(op_name, &attrs).map_err(err)?;
        // Every attribute must be one the op has, once (a flipped byte must not turn an
        // attribute into an ignored one).
        let known = op.attrs();
        for (i, (k, _)) in attrs.0.iter().enumerate() {
            if !known.iter().any(|(name, _)| name == k) || attrs.0[..i].iter().any(|(p, _)| p == k) {
                return Err(err(format!("unknown or repeated attribute `{k}` of {op_name}")));
            }
        }
        let id = g.add_typed(op, &operands, ty);
        ids.insert(lhs.to_string(), id);
    }
    let g = graph.ok_or(IrError::Parse { line: 0, msg: "empty IR text".into() })?;
    if !closed {
        return Err(IrError::Parse { line: text.lines().count(), msg: "missing closing `}`".into() });
    }
    g.verify()?;
    Ok(g)
}

fn parse_type(s: &str) -> Result<Type, String> {
    let (dt, dims) = s.split_once('[').ok_or_else(|| format!("bad type `{s}`"))?;
    let dtype = DType::parse(dt).ok_or_else(|| format!("unknown dtype `{dt}`"))?;
    let dims = dims.strip_suffix(']').ok_or_else(|| format!("bad type `{s}`"))?;
    let mut shape = Vec::new();
    for d in dims.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        shape.push(match d {
            "n" => Dim::N,
            "s" => Dim::S,
            _ => Dim::C(d.parse().map_err(|_| format!("bad dim `{d}`"))?),
        });
    }
    Ok(Type::new(dtype, Shape(shape)))
}

/// `key=value key="quoted value" ...`
fn parse_attrs(s: &str) -> Result<Attrs, String> {
    let mut out = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            val.push(chars.next().unwrap_or('"'));
            let mut escaped = false;
            for c in chars.by_ref() {
                val.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    break;
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        if key.is_empty() || key.contains(' ') {
            return Err(format!("bad attribute near `{key}`"));
        }
        out.push((key, val));
    }
    Ok(Attrs(out))
}
