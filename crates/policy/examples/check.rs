fn main() {
    let src = std::fs::read_to_string(std::env::args().nth(1).unwrap()).unwrap();
    match trellis_policy::parse(&src) {
        Ok(p) => println!("ok: {} rules", p.rules.len()),
        Err(es) => es.iter().for_each(|e| println!("{e}")),
    }
}
